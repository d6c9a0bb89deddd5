"""Flax MoE language models, routing statistics, LoRA helpers and Hugging Face I/O."""

from fedalign.models.config import FAMILIES, MoEConfig, family_config
from fedalign.models.decoder import MoEDecoderLM
from fedalign.models.routing import STAT_NAMES, finalize_stats, routing_stats

__all__ = [
    "FAMILIES",
    "MoEConfig",
    "MoEDecoderLM",
    "STAT_NAMES",
    "family_config",
    "finalize_stats",
    "routing_stats",
]
from fedalign.models.api import MoEModel, build_module, init_params  # noqa: E402
from fedalign.models.lora import combine, partition, trainable_mask  # noqa: E402

__all__ += ["MoEModel", "build_module", "combine", "init_params", "partition", "trainable_mask"]
