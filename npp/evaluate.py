"""Evaluation: reproducible sampling for metrics, and FID, IS, precision/recall and KID by torch-fidelity.

    npp evaluate runs/quickstart-npp --num-samples 10000                 # domain FID on the embedded data
    npp evaluate export/ --reference imagenet/val --inception-weights pt_inception.pth --export-npz
    torchrun --nproc_per_node 8 -m npp.cli evaluate runs/B-npp --reference imagenet/val ...

Sample i is drawn with its own generator seeded base_seed + i, so the images do not depend on how
the work is split over processes or restarts: batch k (samples k·b … k·b + b − 1) goes to rank
k mod W, its PNGs are written atomically, and a rerun skips the batches already on disk. Rank 0
then computes the metrics and writes results.json beside the samples, with everything a number
needs to be trusted (torch-fidelity version, feature extractor and weights hash, reference
identity and size, sampler settings, seeds, model identity).

Two feature extractors: torch-fidelity's `inception-v3-compat` (standard FID for ImageNet; give
`--inception-weights PATH` on a machine without internet) and the shipped MNIST classifier,
registered with torch-fidelity as `npp-mnist-classifier`, for domain FID/IS on the embedded data.
Domain numbers measure the same things but on another feature space: they are not comparable to
ImageNet FID.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from npp.classifier import EMBEDDED_CLASSIFIER, MnistClassifier, predict
from npp.config import ConfigError, cache_dir, dump_json, field_docs
from npp.data import MNIST_CLASSES, DataError, mnist_images, to_unit_range
from npp.extract import _Ranks, load_tokenizer
from npp.model import GPT
from npp.sampling import generate
from npp.tokenizer import VQModel, to_uint8
from npp.tokenizer_train import EMBEDDED_TOKENIZERS, load_embedded_tokenizer
from npp.weights import CheckpointError

MNIST_EXTRACTOR = "npp-mnist-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception weights (the TF FID network), as its downloader names them."""
EMBEDDED_REFERENCES = ("mnist-test", "mnist-train")
METRICS = ("fid", "isc", "prc", "kid")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """What to sample and what to compare it with; every field is recorded in results.json."""

    num_samples: int = 10_000
    """Number of generated images (the paper uses 50,000 for ImageNet)."""
    batch_size: int = 100
    """Samples per generation batch. Part of the sampling recipe: the same value gives the same images."""
    base_seed: int = 0
    """Sample i is drawn with a generator seeded base_seed + i."""
    labels: str = "balanced"
    """'balanced': sample i asks for class i mod C; 'random': a class drawn from sample i's generator."""
    cfg_scale: float = 2.0
    """Classifier-free guidance scale (≤ 1 turns guidance off)."""
    cfg_interval: int = -1
    """Guide only the first cfg_interval + 2 tokens, as in LlamaGen; -1 guides every token."""
    temperature: float = 1.0
    """Softmax temperature of sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    reference: str = "auto"
    """'mnist-test' or 'mnist-train' (the embedded data), an image folder, an .npz with reference
    images (arr_0, as in the ADM evaluator's batches) or FID statistics (mu, sigma; FID only), or
    'auto': the embedded test split for runs on the embedded data."""
    feature_extractor: str = "auto"
    """'npp-mnist-classifier' (domain metrics), 'inception-v3-compat' (standard FID), or 'auto':
    the classifier for the embedded data, Inception otherwise."""
    inception_weights: str | None = None
    """Path of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth); by
    default the torch hub cache, where torch-fidelity downloads them."""
    metrics: tuple[str, ...] = METRICS
    """Which of fid, isc (Inception score), prc (precision/recall, k = 3) and kid to compute."""
    kid_subset_size: int = 1000
    """KID subset size; lowered to the number of images when there are fewer."""
    save_png: bool = True
    """Write every sample as a PNG (needed to resume and to shard); off keeps them in memory."""
    export_npz: bool = False
    """Also write samples.npz with arr_0 (N×H×W×3 uint8), the batch the OpenAI ADM evaluator reads."""
    device: str = "auto"
    """'cpu', 'cuda' (this rank's GPU under a launcher) or 'auto'."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        for name in ("num_samples", "batch_size", "kid_subset_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"EvalConfig.{name}={value!r}: use a positive integer")
        _check(self.labels in ("balanced", "random"),
               f"EvalConfig.labels={self.labels!r}: use 'balanced' or 'random'")
        _check(self.feature_extractor in ("auto", MNIST_EXTRACTOR, INCEPTION_EXTRACTOR),
               f"EvalConfig.feature_extractor={self.feature_extractor!r}: use 'auto', "
               f"'{MNIST_EXTRACTOR}' or '{INCEPTION_EXTRACTOR}'")
        unknown = sorted(set(self.metrics) - set(METRICS))
        _check(not unknown and self.metrics, f"EvalConfig.metrics={list(self.metrics)}: choose from {list(METRICS)}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"EvalConfig.device={self.device!r}: use 'auto', 'cpu' or 'cuda'")

    def sampler(self) -> dict[str, Any]:
        """The settings that decide the images (and so name the sample folder)."""
        keys = ("num_samples", "batch_size", "base_seed", "labels", "cfg_scale", "cfg_interval",
                "temperature", "top_k", "top_p")
        return {k: getattr(self, k) for k in keys}

    def folder_name(self) -> str:
        s = self.sampler()
        return (f"n{s['num_samples']}-seed{s['base_seed']}-{s['labels']}-cfg{s['cfg_scale']:g}"
                f"-i{s['cfg_interval']}-t{s['temperature']:g}-k{s['top_k']}-p{s['top_p']:g}-b{s['batch_size']}")


# ------------------------------------------------------------------------------------------------
# What is evaluated: a run or an export, with its tokenizer
# ------------------------------------------------------------------------------------------------

@dataclass
class Subject:
    """A trained model ready to sample, with what identifies it."""

    model: GPT
    vq: VQModel
    export: Path
    mnist: bool
    """Trained on the embedded MNIST: its classifier is the judge and its test split the reference."""
    identity: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_on_mnist(info: dict[str, Any]) -> bool:
    """Whether a tokenizer reference (an export's tokenizer.json) says the codes are embedded MNIST."""
    return info.get("data") in EMBEDDED_TOKENIZERS or (info.get("source") or {}).get("kind") == "mnist"


def tokenizer_for(info: dict[str, Any], vocab_size: int, *, override: str | None = None,
                  where: str = "the run") -> VQModel:
    """The tokenizer that decodes a model's codes, from the tokenizer reference its export carries
    ({"data", "fingerprint", "path", "config"}): an embedded one by name, else the path the codes were
    extracted with; `override` replaces that path, and the weights' fingerprint must match."""
    data, path = info.get("data"), override or info.get("path")
    if path:
        vq = load_tokenizer(path, **({} if Path(path).is_dir() else info.get("config", {})))
    elif data in EMBEDDED_TOKENIZERS:
        vq = load_embedded_tokenizer(data)
    else:
        raise ConfigError(f"{where} does not say which tokenizer decodes its codes: pass --tokenizer "
                          f"PATH (the folder or LlamaGen .pt its training codes were extracted with)")
    expected = info.get("fingerprint")
    if expected and vq.fingerprint() != expected:
        raise ConfigError(f"the tokenizer's weights differ from those the training codes were extracted with "
                          f"(fingerprint {vq.fingerprint()[:12]} ≠ {expected[:12]}): pass the right --tokenizer")
    _check(vq.config.codebook_size == vocab_size,
           f"the tokenizer has {vq.config.codebook_size} codes but the model predicts {vocab_size}: "
           f"pass the tokenizer the model was trained with (--tokenizer)")
    return vq


def load_subject(path: str | os.PathLike, *, tokenizer: str | None = None,
                 device: torch.device | str = "cpu") -> Subject:
    """A run directory (runs/<name>) or its export folder, and the tokenizer it was trained with.

    The tokenizer comes from the export's tokenizer.json (an embedded one by name, or the path it was
    extracted with); `tokenizer` overrides the path, and its fingerprint must match.
    """
    path = Path(path)
    export = path / "export" if (path / "export" / "model.safetensors").is_file() else path
    if not (export / "model.safetensors").is_file():
        hint = (" (a run without export: run `npp export " + str(path) + "` first)"
                if (path / "config.json").is_file() and (path / "checkpoints").is_dir() else "")
        raise ConfigError(f"{path}: not a run directory or an export folder{hint}; give runs/<name> "
                          f"or a folder written by GPT.save_pretrained")
    model = GPT.from_pretrained(export).to(device).eval()
    info_path = export / "tokenizer.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    vq = tokenizer_for(info, model.config.vocab_size, override=tokenizer, where=str(export))
    identity = {"export": str(export.resolve()), "model_sha256": _sha256(export / "model.safetensors"),
                "config": model.config.to_dict(), "data": info.get("data"), "tokenizer_fingerprint": vq.fingerprint()}
    source = export / "source.json"
    if source.is_file():
        identity["source"] = json.loads(source.read_text())
    return Subject(model, vq.to(device).eval(), export, trained_on_mnist(info), identity)


# ------------------------------------------------------------------------------------------------
# Sampling: sample i depends on base_seed + i only
# ------------------------------------------------------------------------------------------------

def sample_generators(indices: Sequence[int], base_seed: int, device: torch.device | str = "cpu"
                      ) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(base_seed + i) for i in indices]


def sample_labels(indices: Sequence[int], num_classes: int, mode: str,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Balanced: class i mod C. Random: the first draw of sample i's own generator."""
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    return torch.cat([torch.randint(num_classes, (1,), generator=g, device=g.device).cpu() for g in generators])


@torch.no_grad()
def draw_samples(subject: Subject, indices: Sequence[int], config: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded samples (B, H, W, 3) uint8 and their labels for the given sample indices."""
    device = subject.model.tok_embeddings.weight.device
    generators = sample_generators(indices, config.base_seed, device)
    labels_B = sample_labels(indices, subject.model.config.num_classes, config.labels, generators)
    tokens_BL = generate(subject.model, labels_B, cfg_scale=config.cfg_scale, cfg_interval=config.cfg_interval,
                         temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                         generator=generators)
    grid = subject.model.config.grid
    return to_uint8(subject.vq.decode(tokens_BL.view(-1, grid, grid))).cpu(), labels_B


def draw_all(subject: Subject, config: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample in memory, batch by batch as sample_to_folder draws them: (N, H, W, 3) and (N,)."""
    indices = range(config.num_samples)
    chunks = [draw_samples(subject, indices[k:k + config.batch_size], config)
              for k in range(0, config.num_samples, config.batch_size)]
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


def _png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def _write_png(image_HW3: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_HW3).save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed rank leaves no half-written sample behind


def sample_to_folder(subject: Subject, config: EvalConfig, folder: Path, *, rank: int = 0, world: int = 1,
                     on_batch: Callable[[int], None] | None = None) -> int:
    """This rank's batches (k ≡ rank mod world) as PNGs; finished batches are skipped. Returns samples drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for k in range(rank, math.ceil(config.num_samples / config.batch_size), world):
        indices = range(k * config.batch_size, min(config.num_samples, (k + 1) * config.batch_size))
        if not all(_png_path(folder, i).is_file() for i in indices):
            images, _ = draw_samples(subject, indices, config)
            for i, image in zip(indices, images.numpy()):
                _write_png(image, _png_path(folder, i))
            drawn += len(indices)
        if on_batch is not None:
            on_batch(len(indices))
    return drawn


def read_samples(folder: Path, num_samples: int) -> torch.Tensor:
    """The PNGs of samples 0 … num_samples − 1 as (N, H, W, 3) uint8."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(_png_path(folder, i)).convert("RGB"))
                                      for i in range(num_samples)]))


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------

def register_mnist_extractor() -> None:
    """Register the shipped MNIST classifier with torch-fidelity as 'npp-mnist-classifier' (domain FID,
    IS, precision/recall, KID), so that `torch_fidelity.calculate_metrics(feature_extractor=...)` finds it."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if MNIST_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class MnistClassifierFeatures(FeatureExtractorBase):
        """uint8 (B, 3, 32, 32) to the classifier's penultimate features and its logits."""

        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                     **kwargs: Any):
            super().__init__(name, features_list)
            self.classifier = MnistClassifier.from_pretrained(feature_extractor_weights_path or EMBEDDED_CLASSIFIER)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.classifier.features(to_unit_range(images_B3HW))
            out = {"features": features, "logits": self.classifier.head(features)}
            return tuple(out[name] for name in self.features_list)

    register_feature_extractor(MNIST_EXTRACTOR, MnistClassifierFeatures)


def inception_weights_path(given: str | None) -> Path:
    """The Inception weights file to use: the one given, or torch-fidelity's download in the hub cache.

    Checked here, before any sampling: it must exist and hold only tensors (weights_only=True), since
    torch-fidelity itself unpickles it without that guard.
    """
    path = Path(given) if given else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise ConfigError(f"no Inception weights at {path}: pass --inception-weights PATH "
                          f"(torch-fidelity's {INCEPTION_FILE}, downloaded once on a machine with internet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file gets the same one-line answer)
        raise ConfigError(f"{path} is not a weights file torch can read safely ({type(err).__name__}): "
                          f"pass torch-fidelity's {INCEPTION_FILE}") from None
    if not isinstance(state, dict) or "fc.weight" not in state or tuple(state["fc.weight"].shape) != (1008, 2048):
        raise ConfigError(f"{path} does not hold torch-fidelity's Inception-v3 weights (no fc.weight of "
                          f"shape 1008×2048): pass {INCEPTION_FILE}")
    return path


def resolve_extractor(config: EvalConfig, mnist: bool) -> tuple[str, Path | None, str]:
    """(torch-fidelity extractor name, weights path or None, sha256 of the weights)."""
    name = config.feature_extractor
    if name == "auto":
        name = MNIST_EXTRACTOR if mnist else INCEPTION_EXTRACTOR
    if name == MNIST_EXTRACTOR:
        register_mnist_extractor()
        return name, None, _sha256(EMBEDDED_CLASSIFIER / "model.safetensors")
    path = inception_weights_path(config.inception_weights)
    return name, path, _sha256(path)


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------

class UInt8Images(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 images as the (3, H, W) uint8 items torch-fidelity reads."""

    def __init__(self, images_NHW3: torch.Tensor):
        self.images = images_NHW3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].permute(2, 0, 1).contiguous()


@dataclass
class Reference:
    """What the samples are compared with: a torch-fidelity input, its size, image side and identity."""

    input: Any
    count: int
    image_size: tuple[int, int] | None
    """Side of the images; None for statistics, which fit any size."""
    identity: dict[str, Any]
    statistics: dict[str, np.ndarray] | None = None
    """FID's mu and sigma when the reference is a statistics file rather than images."""


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def resolve_reference(spec: str, mnist: bool) -> Reference:
    """'mnist-test', 'mnist-train', an image folder, an .npz of images (arr_0) or of FID statistics
    (mu, sigma), or 'auto' (the test split for MNIST runs)."""
    if spec == "auto":
        if not mnist:
            raise ConfigError("this model was not trained on the embedded data: pass --reference FOLDER "
                              "(real images of the same resolution, e.g. the ImageNet validation set)")
        spec = "mnist-test"
    if spec in EMBEDDED_REFERENCES:
        images_N3HW, _ = mnist_images(spec.split("-")[1])
        images = images_N3HW.permute(0, 2, 3, 1)
        return Reference(UInt8Images(images), len(images), tuple(images.shape[1:3]),
                         {"kind": "embedded", "name": spec, "count": len(images)})
    if spec.endswith(".npz"):
        return _npz_reference(Path(spec))
    folder = Path(spec)
    if not folder.is_dir():
        raise ConfigError(f"reference {spec!r} is not an image folder nor one of {list(EMBEDDED_REFERENCES)}: "
                          f"give a folder of real images (npp evaluate --reference, npp train --eval_reference)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"reference folder {folder} holds no .png/.jpg images: point --reference at the "
                          f"real images (searched recursively)")
    with Image.open(files[0]) as first:
        size = (first.height, first.width)
    listing = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size}" for p in files)
    identity = {"kind": "folder", "path": str(folder.resolve()), "count": len(files),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return Reference(str(folder), len(files), size, identity)


def _npz_reference(path: Path) -> Reference:
    """An .npz of reference images (arr_0, N×H×W×3 uint8, as in the ADM evaluator's reference batches)
    or of FID statistics (mu, sigma of the extractor's features; FID only)."""
    if not path.is_file():
        raise ConfigError(f"reference {path}: no such file; give an .npz with arr_0 (images) or mu and sigma")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        identity = {"kind": "npz", "path": str(path.resolve()), "sha256": _sha256(path)}
        if "arr_0" in keys:
            images = npz["arr_0"]
            _check(images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8 and len(images) > 1,
                   f"{path}: arr_0 has shape {images.shape} and dtype {images.dtype}; the reference images "
                   f"must be N×H×W×3 uint8 (N ≥ 2)")
            return Reference(UInt8Images(torch.from_numpy(images)), len(images), tuple(images.shape[1:3]),
                             {**identity, "count": len(images)})
        _check({"mu", "sigma"} <= keys, f"{path} holds {sorted(keys)}: give an .npz with arr_0 (reference "
                                         f"images) or with mu and sigma (FID statistics)")
        stats = {"mu": npz["mu"], "sigma": npz["sigma"]}
    _check(stats["mu"].ndim == 1 and stats["sigma"].shape == (len(stats["mu"]),) * 2,
           f"{path}: mu must be a vector and sigma its square covariance, got {stats['mu'].shape} and "
           f"{stats['sigma'].shape}")
    return Reference(None, 0, None, {**identity, "statistics": True}, stats)


def save_reference_statistics(reference: Reference, path: str | os.PathLike, *, extractor: str,
                              weights: Path | None = None) -> Path:
    """Write FID statistics (mu, sigma) of a reference's features, to use later as --reference FILE.npz."""
    import torch_fidelity.metric_fid as metric_fid
    from torch_fidelity.utils import create_feature_extractor

    if extractor == MNIST_EXTRACTOR:
        register_mnist_extractor()
    layer = _fid_layer(extractor)
    features = create_feature_extractor(extractor, [layer], cuda=torch.cuda.is_available(),
                                        feature_extractor_weights_path=None if weights is None else str(weights),
                                        verbose=False)
    stats = metric_fid.fid_input_id_to_statistics(1, features, layer, input1=reference.input,
                                                  cuda=torch.cuda.is_available(), verbose=False,
                                                  samples_find_deep=True)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"])
    os.replace(tmp, path)
    return path


def _fid_layer(extractor: str) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def fidelity_metrics(samples: str | torch.Tensor, reference: Reference, metrics: Sequence[str], *,
                     extractor: str, weights: Path | None = None, weights_sha256: str = "",
                     kid_subset_size: int = 1000, num_samples: int | None = None,
                     verbose: bool = False) -> dict[str, float]:
    """torch-fidelity's metrics of samples (a PNG folder or (N, H, W, 3) uint8) against a reference.

    The reference's features are cached under cache_dir()/fidelity, keyed by its identity and the
    extractor's weights, so a second evaluation against it only extracts the samples.
    """
    import torch_fidelity

    if extractor == MNIST_EXTRACTOR:
        register_mnist_extractor()
    if isinstance(samples, torch.Tensor):
        num_samples = len(samples)
        samples = UInt8Images(samples)
    assert num_samples is not None
    if reference.statistics is not None:
        return _fid_against_statistics(samples, reference, metrics, extractor, weights)
    key = hashlib.sha256(json.dumps([reference.identity, extractor, weights_sha256], sort_keys=True).encode())
    wanted = set(metrics)
    raw = torch_fidelity.calculate_metrics(
        input1=samples, input2=reference.input, cuda=torch.cuda.is_available(),
        fid="fid" in wanted, isc="isc" in wanted, prc="prc" in wanted, kid="kid" in wanted,
        feature_extractor=extractor,
        feature_extractor_weights_path=None if weights is None else str(weights),
        kid_subset_size=min(kid_subset_size, num_samples, reference.count),
        isc_splits=min(10, num_samples),  # the standard 10 splits, fewer only for tiny test runs
        cache=True, cache_root=str(cache_dir() / "fidelity"), input1_cache_name=None,
        input2_cache_name=f"ref-{key.hexdigest()[:20]}", samples_find_deep=True, verbose=verbose)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "precision": "precision", "recall": "recall", "kernel_inception_distance_mean": "kid",
             "kernel_inception_distance_std": "kid_std"}
    return {names[k]: float(v) for k, v in raw.items() if k in names}


def _fid_against_statistics(samples: Any, reference: Reference, metrics: Sequence[str], extractor: str,
                            weights: Path | None) -> dict[str, float]:
    import torch_fidelity.metric_fid as metric_fid
    from torch_fidelity.utils import create_feature_extractor

    _check(set(metrics) == {"fid"}, f"a statistics reference ({reference.identity['path']}) gives FID only: "
                                    f"pass --metrics fid, or give reference images")
    layer = _fid_layer(extractor)
    features = create_feature_extractor(extractor, [layer], cuda=torch.cuda.is_available(),
                                        feature_extractor_weights_path=None if weights is None else str(weights),
                                        verbose=False)
    stats = metric_fid.fid_input_id_to_statistics(1, features, layer, input1=samples, cuda=torch.cuda.is_available(),
                                                  verbose=False, samples_find_deep=True)
    _check(stats["mu"].shape == reference.statistics["mu"].shape,
           f"the reference statistics have {reference.statistics['mu'].shape[0]} features but {extractor} gives "
           f"{stats['mu'].shape[0]}: use statistics made with the same feature extractor")
    # torch-fidelity computes both sides in the features' dtype; so do we.
    ref = {k: v.astype(stats[k].dtype) for k, v in reference.statistics.items()}
    return {"fid": metric_fid.fid_statistics_to_metric(stats, ref, False)[metric_fid.KEY_METRIC_FID]}


def class_accuracy(images_NHW3: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Share of samples that the shipped MNIST classifier assigns to the class they were asked for."""
    classifier = MnistClassifier.from_pretrained(EMBEDDED_CLASSIFIER)
    return (predict(classifier, images_NHW3.permute(0, 3, 1, 2)) == labels_N).float().mean().item()


def score(samples: str | torch.Tensor, images_NHW3: torch.Tensor, labels_N: torch.Tensor, reference: Reference,
          config: EvalConfig, *, extractor: str, weights: Path | None, weights_sha256: str) -> dict[str, float]:
    """The configured torch-fidelity metrics, plus class accuracy where the MNIST judge applies."""
    metrics = fidelity_metrics(samples, reference, config.metrics, extractor=extractor, weights=weights,
                               weights_sha256=weights_sha256, kid_subset_size=config.kid_subset_size,
                               num_samples=len(images_NHW3), verbose=config.progress)
    if extractor == MNIST_EXTRACTOR and int(labels_N.max()) < len(MNIST_CLASSES):
        metrics["class_accuracy"] = class_accuracy(images_NHW3, labels_N)
    return metrics


class QuickEval:
    """The trainer's periodic evaluation: samples in memory, metrics, nothing written but the row.

    What can fail (weights file, reference, image size) is resolved when it is built, before training.
    """

    def __init__(self, config: EvalConfig, vq: VQModel, mnist: bool, grid: int):
        self.config, self.vq, self.mnist = config, vq, mnist
        self.extractor, self.weights, self.weights_sha = resolve_extractor(config, mnist)
        self.reference = resolve_reference(config.reference, mnist)
        _check_sizes(self.reference, vq.config.downsample * grid)

    def __call__(self, model: GPT) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """(metrics, images (N, H, W, 3) uint8, labels (N,)) of the model as it is now."""
        subject = Subject(model, self.vq.to(model.tok_embeddings.weight.device), Path("."), self.mnist, {})
        images, labels = draw_all(subject, self.config)
        metrics = score(images, images, labels, self.reference, self.config, extractor=self.extractor,
                        weights=self.weights, weights_sha256=self.weights_sha)
        return metrics, images, labels


def _check_sizes(reference: Reference, side: int) -> None:
    _check(reference.image_size in (None, (side, side)),
           f"the reference images are {reference.image_size[0]}×{reference.image_size[1]} but the samples "
           f"will be {side}×{side}: give a --reference of {side}×{side} images (resize/crop them as the "
           f"training images were)")


# ------------------------------------------------------------------------------------------------
# The whole evaluation
# ------------------------------------------------------------------------------------------------

def _device(config: EvalConfig, world: int) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def evaluate(path: str | os.PathLike, config: EvalConfig, *, out: str | os.PathLike | None = None,
             tokenizer: str | None = None) -> dict[str, Any] | None:
    """Sample, measure and write results.json; returns the results on rank 0 (None on other ranks).

    Everything that can be wrong with the inputs (unknown run, missing weights, empty or mismatched
    reference) is found before the first sample is drawn.
    """
    ranks = _Ranks.join()
    try:
        device = _device(config, ranks.world)
        subject = load_subject(path, tokenizer=tokenizer, device=device)
        extractor, weights, weights_sha = resolve_extractor(config, subject.mnist)
        reference = resolve_reference(config.reference, subject.mnist)
        _check_sizes(reference, subject.vq.config.downsample * subject.model.config.grid)
        folder = Path(out) if out else subject.export.parent / "eval" / config.folder_name()
        started = time.perf_counter()
        if config.save_png:
            samples_dir = folder / "samples"
            bar = _bar(config.num_samples, "sampling", config.progress and ranks.rank == 0)
            drawn = sample_to_folder(subject, config, samples_dir, rank=ranks.rank, world=ranks.world,
                                     on_batch=lambda n: bar.update(n * ranks.world))
            bar.close()
            ranks.barrier()
            drawn = ranks.total(drawn)
            in_memory = None
        else:
            _check(ranks.world == 1, "EvalConfig.save_png=False keeps samples in memory: run it in one process")
            in_memory = draw_all(subject, config)
            drawn = config.num_samples
        sampling_seconds = time.perf_counter() - started
        # Every rank waits for rank 0's metrics, so a failure there is raised everywhere.
        results = ranks.on_rank0(lambda: _measure(subject, config, folder, reference, extractor, weights,
                                                  weights_sha, drawn, sampling_seconds, in_memory))
        return results if ranks.rank == 0 else None
    finally:
        ranks.leave()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


def _measure(subject: Subject, config: EvalConfig, folder: Path, reference: Reference, extractor: str,
             weights: Path | None, weights_sha: str, drawn: int, sampling_seconds: float,
             in_memory: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    import torch_fidelity

    if in_memory is None:
        images = read_samples(folder / "samples", config.num_samples)
        indices = range(config.num_samples)
        labels = sample_labels(indices, subject.model.config.num_classes, config.labels,
                               sample_generators(indices, config.base_seed))
    else:
        images, labels = in_memory
    started = time.perf_counter()
    samples_input = str(folder / "samples") if config.save_png else images
    metrics = score(samples_input, images, labels, reference, config, extractor=extractor, weights=weights,
                    weights_sha256=weights_sha)
    domain = extractor == MNIST_EXTRACTOR
    results = {
        "metrics": metrics,
        "note": ("domain metrics: features of the shipped MNIST classifier, not Inception; not comparable "
                 "to ImageNet FID" if domain else "Inception-v3 (torch-fidelity's inception-v3-compat) FID"),
        "num_samples": config.num_samples,
        "sampler": config.sampler(),
        "seeds": f"sample i uses torch.Generator().manual_seed({config.base_seed} + i)",
        "feature_extractor": {"name": extractor, "weights": str(weights) if weights else str(EMBEDDED_CLASSIFIER),
                              "weights_sha256": weights_sha},
        "reference": reference.identity,
        "torch_fidelity": torch_fidelity.__version__,
        "torch": torch.__version__,
        "model": subject.identity,
        "samples": str(folder / "samples") if config.save_png else None,
        "seconds": {"sampling": round(sampling_seconds, 2), "metrics": round(time.perf_counter() - started, 2)},
        "drawn_this_run": drawn,
        "config": {**dataclasses.asdict(config), "metrics": list(config.metrics)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    if config.export_npz:
        tmp = folder / ".samples.npz.tmp.npz"
        np.savez(tmp, arr_0=images.numpy())
        os.replace(tmp, folder / "samples.npz")
        results["npz"] = str(folder / "samples.npz")
    results["results"] = str(folder / "results.json")
    dump_json(results, folder / "results.json")
    return results


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npp evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run directory (runs/<name>) or an export folder")
    parser.add_argument("--out", help="output folder (default: <run>/eval/<sampler settings>)")
    parser.add_argument("--tokenizer", help="tokenizer folder or LlamaGen VQ .pt (default: the export's tokenizer.json)")
    docs = field_docs(EvalConfig)
    for field in dataclasses.fields(EvalConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=docs.get(field.name))
        elif field.name == "metrics":
            parser.add_argument(flag, nargs="+", default=list(METRICS), help=docs.get(field.name))
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=field.default, help=docs.get(field.name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)}
    try:
        config = EvalConfig(**values)
        results = evaluate(args.path, config, out=args.out, tokenizer=args.tokenizer)
    except (ConfigError, CheckpointError, DataError) as err:
        print(f"npp evaluate: error: {err}", file=sys.stderr)
        return 2
    if results is not None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in results["metrics"].items())
        print(f"{shown}\n{results['note']}\nresults: {results['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
