"""The torch-fidelity side of evaluation: feature extractors, reference images, and the metrics.

Two feature extractors: torch-fidelity's `inception-v3-compat` (standard FID for ImageNet; give
`--inception-weights PATH` on a machine without internet) and the shipped MNIST classifier,
registered with torch-fidelity as `npp-mnist-classifier`, for domain FID/IS on the embedded data.
Domain numbers measure the same things but on another feature space: they are not comparable to
ImageNet FID. References: the embedded test or train split, an image folder, an .npz of images
(arr_0, as the ADM evaluator's batches) or of FID statistics (mu, sigma).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from npp.classifier import EMBEDDED_CLASSIFIER, MnistClassifier, predict
from npp.config import cache_dir
from npp.data import mnist_images, to_unit_range
from npp.errors import CheckpointError, ConfigError, check, require
from npp.files import atomic_path, is_image, sha256_file
from npp.images import to_rgb8
from npp.weights import safe_load

MNIST_EXTRACTOR = "npp-mnist-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception weights (the TF FID network), as its downloader names them."""
EMBEDDED_REFERENCES = ("mnist-test", "mnist-train")
METRICS = ("fid", "isc", "prc", "kid")
FEW_CORES = (os.cpu_count() or 1) < 4
"""torch-fidelity's save_cpu_ram: its only effect is to read images in the main process instead of 4 loader
workers, which on a machine of few cores are slower than none (and make torch warn)."""


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
        state = safe_load(path)
    except CheckpointError as err:
        raise ConfigError(f"{err} (--inception-weights wants torch-fidelity's {INCEPTION_FILE})") from None
    if not isinstance(state, dict) or "fc.weight" not in state or tuple(state["fc.weight"].shape) != (1008, 2048):
        raise ConfigError(f"{path} does not hold torch-fidelity's Inception-v3 weights (no fc.weight of "
                         f"shape 1008×2048): pass {INCEPTION_FILE}")
    return path


def resolve_extractor(name: str, inception_weights: str | None, mnist: bool) -> tuple[str, Path | None, str]:
    """(torch-fidelity extractor name, weights path or None, sha256 of the weights); name 'auto' is the
    MNIST classifier for models trained on the embedded data, Inception otherwise."""
    if name == "auto":
        name = MNIST_EXTRACTOR if mnist else INCEPTION_EXTRACTOR
    if name == MNIST_EXTRACTOR:
        register_mnist_extractor()
        return name, None, sha256_file(EMBEDDED_CLASSIFIER / "model.safetensors")
    path = inception_weights_path(inception_weights)
    return name, path, sha256_file(path)


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


class ImageFiles(torch.utils.data.Dataset):
    """Image files as (3, H, W) uint8 items, read by npp's one conversion (npp.images.to_rgb8: 16-bit, float,
    CMYK, transparency, ...) rather than torch-fidelity's plain convert("RGB"), which clips 16-bit images."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image  # npp.data has imported it already

        with Image.open(self.files[index]) as image:
            return torch.from_numpy(np.array(to_rgb8(image))).permute(2, 0, 1).contiguous()  # a writable copy


PIXELS = "npp.to_rgb8/1"
"""Names the conversion of reference files in their identity, so features cached under an older one are not reused."""


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
                         f"give a folder of real images (npp evaluate --reference, npp train --eval-reference)")
    files = sorted(p for p in folder.rglob("*") if is_image(p.name))
    if not files:
        raise ConfigError(f"reference folder {folder} holds no images (.png, .jpg, .webp, …): point --reference at "
                         f"the real images (searched recursively)")
    with require("PIL.Image", "reference image folders").open(files[0]) as first:
        size = (first.height, first.width)
    listing = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size}" for p in files)
    identity = {"kind": "folder", "path": str(folder.resolve()), "count": len(files),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest(), "pixels": PIXELS}
    return Reference(ImageFiles(files), len(files), size, identity)


def _npz_reference(path: Path) -> Reference:
    """An .npz of reference images (arr_0, N×H×W×3 uint8, as in the ADM evaluator's reference batches)
    or of FID statistics (mu, sigma of the extractor's features; FID only)."""
    if not path.is_file():
        raise ConfigError(f"reference {path}: no such file; give an .npz with arr_0 (images) or mu and sigma")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        identity = {"kind": "npz", "path": str(path.resolve()), "sha256": sha256_file(path)}
        if "arr_0" in keys:
            images = npz["arr_0"]
            check(images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8 and len(images) > 1,
                  f"{path}: arr_0 has shape {images.shape} and dtype {images.dtype}; the reference images "
                  f"must be N×H×W×3 uint8 (N ≥ 2)")
            return Reference(UInt8Images(torch.from_numpy(images)), len(images), tuple(images.shape[1:3]),
                             {**identity, "count": len(images)})
        check({"mu", "sigma"} <= keys, f"{path} holds {sorted(keys)}: give an .npz with arr_0 (reference "
                                        f"images) or with mu and sigma (FID statistics)")
        stats = {"mu": npz["mu"], "sigma": npz["sigma"]}
    check(stats["mu"].ndim == 1 and stats["sigma"].shape == (len(stats["mu"]),) * 2,
          f"{path}: mu must be a vector and sigma its square covariance, got {stats['mu'].shape} and "
          f"{stats['sigma'].shape}")
    return Reference(None, 0, None, {**identity, "statistics": True}, stats)


def save_reference_statistics(reference: Reference, path: str | os.PathLike, *, extractor: str,
                              weights: Path | None = None) -> Path:
    """Write FID statistics (mu, sigma) of a reference's features, to use later as --reference FILE.npz."""
    stats = _statistics(reference.input, extractor, weights)
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"])
    return Path(path)


def _statistics(images: Any, extractor: str, weights: Path | None) -> dict[str, np.ndarray]:
    """FID's mu and sigma of the extractor's features of some images (a torch-fidelity input)."""
    import torch_fidelity.metric_fid as metric_fid
    from torch_fidelity.utils import create_feature_extractor

    if extractor == MNIST_EXTRACTOR:
        register_mnist_extractor()
    layer = _fid_layer(extractor)
    features = create_feature_extractor(extractor, [layer], cuda=torch.cuda.is_available(),
                                        feature_extractor_weights_path=None if weights is None else str(weights),
                                        verbose=False)
    return metric_fid.fid_input_id_to_statistics(1, features, layer, input1=images, cuda=torch.cuda.is_available(),
                                                 verbose=False, samples_find_deep=True, save_cpu_ram=FEW_CORES)


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
        input2_cache_name=f"ref-{key.hexdigest()[:20]}", samples_find_deep=True, save_cpu_ram=FEW_CORES,
        verbose=verbose)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "precision": "precision", "recall": "recall", "kernel_inception_distance_mean": "kid",
             "kernel_inception_distance_std": "kid_std"}
    return {names[k]: float(v) for k, v in raw.items() if k in names}


def _fid_against_statistics(samples: Any, reference: Reference, metrics: Sequence[str], extractor: str,
                            weights: Path | None) -> dict[str, float]:
    import torch_fidelity.metric_fid as metric_fid

    check(set(metrics) == {"fid"}, f"a statistics reference ({reference.identity['path']}) gives FID only: "
                                   f"pass --metrics fid, or give reference images")
    stats = _statistics(samples, extractor, weights)
    check(stats["mu"].shape == reference.statistics["mu"].shape,
          f"the reference statistics have {reference.statistics['mu'].shape[0]} features but {extractor} gives "
          f"{stats['mu'].shape[0]}: use statistics made with the same feature extractor")
    # torch-fidelity computes both sides in the features' dtype; so do we.
    ref = {k: v.astype(stats[k].dtype) for k, v in reference.statistics.items()}
    return {"fid": metric_fid.fid_statistics_to_metric(stats, ref, False)[metric_fid.KEY_METRIC_FID]}


def class_accuracy(images_NHW3: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Share of samples that the shipped MNIST classifier assigns to the class they were asked for."""
    classifier = MnistClassifier.from_pretrained(EMBEDDED_CLASSIFIER)
    return (predict(classifier, images_NHW3.permute(0, 3, 1, 2)) == labels_N).float().mean().item()


def check_image_size(reference: Reference, side: int) -> None:
    """Samples of side × side pixels can be compared with this reference (statistics fit any size)."""
    check(reference.image_size in (None, (side, side)),
          f"the reference images are {reference.image_size[0]}×{reference.image_size[1]} but the samples "
          f"will be {side}×{side}: give a --reference of {side}×{side} images (resize/crop them as the "
          f"training images were)")
