"""npp: a workbench for Next Patch Prediction (arXiv 2412.15321) on LlamaGen-style models.

`import npp` and everything below need only torch, numpy and safetensors; training, evaluation, the
app and the notebooks come with extras (`pip install "npp[train,eval,app,notebooks]"`, or `npp[all]`).
"""

from npp.config import PAPER_SAMPLER, ModelConfig, SamplerConfig, ScheduleConfig, TrainConfig, VQConfig
from npp.errors import CheckpointError, ConfigError, DataError, MissingExtraError, TrainingError
from npp.model import GPT, KVCache, LlamaGenInference, infer_llamagen
from npp.patching import group_patches, next_patch_loss, patch_targets, patchify, unpatchify
from npp.pipeline import Pipeline
from npp.sampling import generate
from npp.schedule import Stage, lr_at, plan_stages, relative_cost
from npp.tokenizer import VQModel

__version__ = "0.2.0"

__all__ = [
    "GPT", "KVCache", "infer_llamagen", "LlamaGenInference", "ModelConfig", "ScheduleConfig", "TrainConfig", "SamplerConfig", "PAPER_SAMPLER",
    "VQModel", "VQConfig", "Pipeline",
    "ConfigError", "CheckpointError", "DataError", "TrainingError", "MissingExtraError",
    "group_patches", "next_patch_loss", "patch_targets", "patchify", "unpatchify",
    "generate", "Stage", "plan_stages", "lr_at", "relative_cost",
]
