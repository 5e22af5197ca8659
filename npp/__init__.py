"""npp: a workbench for Next Patch Prediction (arXiv 2412.15321) on LlamaGen-style models."""

from npp.config import ConfigError, ModelConfig, ScheduleConfig, VQConfig
from npp.model import GPT, KVCache
from npp.patching import group_patches, next_patch_loss, patch_targets, patchify, unpatchify
from npp.sampling import generate
from npp.schedule import Stage, lr_at, plan_stages, relative_cost
from npp.tokenizer import VQModel
from npp.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "GPT", "KVCache", "ModelConfig", "ScheduleConfig", "ConfigError", "CheckpointError",
    "VQModel", "VQConfig",
    "group_patches", "next_patch_loss", "patch_targets", "patchify", "unpatchify",
    "generate", "Stage", "plan_stages", "lr_at", "relative_cost",
]
