"""fedalign: federated fine-tuning of Mixture-of-Experts language models in JAX/Flax.

Subpackages: :mod:`fedalign.models`, :mod:`fedalign.data`, :mod:`fedalign.federated`,
:mod:`fedalign.aggregation`, :mod:`fedalign.metrics`. Entry point: ``python -m fedalign.main``.
"""

__version__ = "0.1.0"
