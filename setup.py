"""fedalign: federated fine-tuning of Mixture-of-Experts language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="fedalign",
    version="0.1.0",
    description=(
        "FedAlign-MoE and federated baselines for Mixture-of-Experts language models " "in JAX/Flax"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fedalign", "fedalign.*"]),
    package_data={"fedalign": ["data/embedded/*", "data/embedded/**/*", "pretrained/*/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.7.2",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9",
        "array_record>=0.5",
        "ml-collections>=0.1",
        "absl-py",
        "numpy",
        "scipy",
        "safetensors",
        "tokenizers>=0.15",
        "tqdm",
        "matplotlib",
        "dp-accounting>=0.4",  # client-level DP accounting (fedalign/privacy.py)
    ],
    extras_require={
        "torch": ["torch==2.13.0", "transformers>=4.57"],
        # The Flower deployment path (fedalign/flower/apps.py, docs/scaling.md). flwr pins
        # protobuf < 7, rich < 15, typer < 0.21: installing it downgrades those (checked with
        # pip install --dry-run), so it is an extra, not a core dependency.
        "flower": ["flwr>=1.20,<2"],
        "test": [
            "pytest>=7",
            "pytest-xdist",
            "chex",
            "nbclient",
            "nbformat",
            "ipykernel",
            "pyink==26.5.1",
        ],
    },
    entry_points={"console_scripts": ["fedalign=fedalign.main:run"]},
)
