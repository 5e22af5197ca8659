"""A small MNIST classifier: the judge of reconstructions and the feature extractor of domain FID/IS.

It sees the embedded data exactly as the tokenizers do, (B, 3, 32, 32) floats in [-1, 1], so a
tokenizer's reconstructions or a GPT's decoded samples go into it unchanged.

    clf = load_mnist_classifier()                        # the shipped weights (npp/assets)
    logits_BK = clf(images_B3HW)
    features_BF = clf.features(images_B3HW)              # penultimate layer, for FID-style metrics
    accuracy(clf, images_B3HW, labels_B)

    train_classifier(ClassifierTrainConfig(), "runs/classifier")   # `npp classifier train --out DIR`
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from npp.data import MNIST_CLASSES, MNIST_SIZE, mnist_images, to_unit_range
from npp.errors import check, is_int, known_fields
from npp.files import ASSETS, dump_json
from npp.weights import Pretrained

EMBEDDED_CLASSIFIER = ASSETS / "mnist-classifier"
"""The shipped classifier, written by the command recorded in its metrics.json."""


@dataclass
class ClassifierConfig:
    """Architecture of the CNN: conv blocks that halve the resolution, a feature layer, a linear head."""

    widths: tuple[int, ...] = (16, 32, 64)
    """Channels of each conv block (two 3×3 convs + BatchNorm + ReLU, then 2×2 max-pooling)."""
    feature_dim: int = 128
    """Width of the penultimate layer: the `features()` that FID-style metrics compare."""
    num_classes: int = len(MNIST_CLASSES)
    """Number of output classes."""
    image_size: int = MNIST_SIZE
    """Side of the square input images."""
    in_channels: int = 3
    """Input channels (the embedded digits are grey replicated to RGB)."""
    dropout: float = 0.3
    """Dropout before the feature layer and before the head (train mode only)."""

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        check(len(self.widths) >= 1 and all(is_int(w) and w > 0 for w in self.widths),
               f"ClassifierConfig.widths={self.widths}: give one positive channel count per block, e.g. (32, 64)")
        for name in ("feature_dim", "num_classes", "image_size", "in_channels"):
            value = getattr(self, name)
            check(is_int(value) and value > 0,
                   f"ClassifierConfig.{name}={value!r}: must be a positive integer")
        check(self.image_size % 2 ** len(self.widths) == 0,
               f"ClassifierConfig.image_size={self.image_size} must be divisible by 2^{len(self.widths)} "
               f"(one pooling per block): use fewer widths or another size")
        check(0.0 <= self.dropout < 1.0, f"ClassifierConfig.dropout={self.dropout}: must lie in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        return cls(**known_fields(cls, data))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        # No conv bias: BatchNorm's shift replaces it.
        layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class MnistClassifier(Pretrained, nn.Module):
    """Images in [-1, 1], (B, 3, 32, 32), to class logits; `features()` is the penultimate layer."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        widths = [config.in_channels, *config.widths]
        self.blocks = nn.Sequential(*(_conv_block(a, b) for a, b in zip(widths, widths[1:])))
        side = config.image_size // 2 ** len(config.widths)
        self.feature = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                     nn.Linear(config.widths[-1] * side * side, config.feature_dim),
                                     nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes))

    @property
    def device(self) -> torch.device:
        return self.head[1].weight.device

    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim), fp32: what domain FID and precision/recall compare."""
        self._check_images(images_B3HW)
        return self.feature(self.blocks(images_B3HW.to(self.device, torch.float32)))

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(images_B3HW))

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be B × {' × '.join(map(str, expected))} floats in [-1, 1], "
                             f"got shape {tuple(images.shape)}; use npp.data.to_unit_range on uint8 pixels")
        if images.dtype == torch.uint8:
            raise ValueError("images are uint8 pixels: convert them with npp.data.to_unit_range first")


def load_mnist_classifier(device: str | torch.device = "cpu") -> MnistClassifier:
    """The shipped classifier (npp/assets/mnist-classifier), in eval mode."""
    return MnistClassifier.from_pretrained(EMBEDDED_CLASSIFIER, device=device)


@torch.no_grad()
def predict(model: MnistClassifier, images_B3HW: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes (B,) in eval mode, batched; images are floats in [-1, 1] or uint8 pixels."""
    was_training = model.training
    model.eval()
    predictions = []
    for chunk in images_B3HW.split(batch_size):
        chunk = to_unit_range(chunk) if chunk.dtype == torch.uint8 else chunk
        predictions.append(model(chunk).argmax(dim=-1).cpu())
    model.train(was_training)
    return torch.cat(predictions)


def accuracy(model: MnistClassifier, images_B3HW: torch.Tensor, labels_B: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Fraction of images whose predicted class equals the label."""
    return (predict(model, images_B3HW, batch_size) == labels_B.cpu()).sum().item() / len(labels_B)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class ClassifierTrainConfig:
    """How to train the MNIST classifier; the defaults are the recipe of the shipped weights."""

    model: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    """The architecture."""
    epochs: int = 2
    """Passes over the 60,000 training digits."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW) on conv and linear weights; BatchNorm and biases are not decayed."""
    max_shift: float = 2.0
    """Augmentation: random translation of up to this many pixels along each axis."""
    max_rotation: float = 10.0
    """Augmentation: random rotation of up to this many degrees."""
    max_scale: float = 0.1
    """Augmentation: random zoom by a factor in [1 - max_scale, 1 + max_scale]."""
    train_images: int = 0
    """Use only the first this-many training digits (tests); 0 uses all of them."""
    seed: int = 0
    """Seeds the initialisation, the data order and the augmentation."""
    device: str = "cpu"
    """Torch device to train on (cpu, cuda, cuda:1, mps)."""
    progress: bool = True
    """Show a tqdm progress bar with the loss and running accuracy."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ClassifierConfig.from_dict(self.model)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            check(is_int(value) and value > 0,
                   f"ClassifierTrainConfig.{name}={value!r}: must be a positive integer")
        check(self.lr > 0, f"ClassifierTrainConfig.lr={self.lr}: must be positive, e.g. 3e-3")
        check(self.weight_decay >= 0, f"ClassifierTrainConfig.weight_decay={self.weight_decay}: must be ≥ 0")
        for name in ("max_shift", "max_rotation"):
            check(getattr(self, name) >= 0, f"ClassifierTrainConfig.{name}={getattr(self, name)}: must be ≥ 0 "
                                             f"(0 turns that augmentation off)")
        check(0 <= self.max_scale < 1,
               f"ClassifierTrainConfig.max_scale={self.max_scale}: must lie in [0, 1), e.g. 0.1")
        check(is_int(self.train_images) and self.train_images >= 0,
               f"ClassifierTrainConfig.train_images={self.train_images!r}: must be ≥ 0 (0 = all)")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def augment(images_B3HW: torch.Tensor, config: ClassifierTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warps (shift, rotation, zoom), one per image; the background stays -1."""
    B, _, H, W = images_B3HW.shape
    u = torch.rand(B, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(config.max_rotation)
    scale = 1 + u[:, 1] * config.max_scale
    # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2s / side.
    shift = torch.stack([u[:, 2] * 2 * config.max_shift / W, u[:, 3] * 2 * config.max_shift / H], dim=1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta_B23 = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta_B23, list(images_B3HW.shape), align_corners=False)
    return F.grid_sample(images_B3HW, grid.to(images_B3HW.device), padding_mode="border", align_corners=False)


def _optimizer(model: nn.Module, config: ClassifierTrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr)


def train_classifier(config: ClassifierTrainConfig, out: str | os.PathLike | None = None, *,
                     command: str | None = None) -> tuple[MnistClassifier, dict]:
    """Train on the embedded MNIST, evaluate on all test digits; with `out`, save weights and metrics.json.

    Returns the model (eval mode) and its metrics; `command` is recorded in them (default: sys.argv).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images_N3HW, labels_N = mnist_images("train")
    if config.train_images:
        images_N3HW, labels_N = images_N3HW[:config.train_images], labels_N[:config.train_images]
    model = MnistClassifier(config.model).to(config.device)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(labels_N) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=config.epochs * steps_per_epoch)
    bar = _progress(config.epochs * steps_per_epoch, config.progress)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels_N), generator=generator)
        for batch in order.split(config.batch_size):
            images_B3HW = augment(to_unit_range(images_N3HW[batch]), config, generator).to(config.device)
            labels_B = labels_N[batch].to(config.device)
            logits_BK = model(images_B3HW)
            loss = F.cross_entropy(logits_BK, labels_B)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{(logits_BK.argmax(-1) == labels_B).float().mean():.3f}")
    bar.close()
    model.eval()
    test_images, test_labels = mnist_images("test")
    metrics = {"test_accuracy": accuracy(model, test_images, test_labels), "test_images": len(test_labels),
               "train_images": len(labels_N), "epochs": config.epochs,
               "wall_time_s": round(time.perf_counter() - start, 1), "parameters": model.num_params(),
               **run_record(config.device, command), "config": config.to_dict()}
    if out is not None:
        model.save_pretrained(out)
        dump_json(metrics, Path(out) / "metrics.json")
    return model, metrics


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, leave=False)


def run_record(device: str | torch.device, command: str | None = None) -> dict[str, Any]:
    """Where and how a result was produced: the command line (default: this process's), date and machine."""
    device = torch.device(device)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{os.cpu_count()} CPU cores" if device.type == "cpu" else device.type
    return {"command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"), "machine": machine, "torch": torch.__version__}
