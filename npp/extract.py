"""Code extraction: images → crop variants → VQ codes, in memory-mapped arrays (docs/method.md §7).

    npp extract imagenet/train codes/imagenet256 --tokenizer vq_ds16_c2i.pt
    torchrun --nproc_per_node 8 -m npp.cli extract imagenet/train codes/imagenet256 --tokenizer ...

The output folder:

    codes.npy      (N, V, h·w) uint16 (int32 beyond 65,536 codes): row i = item i of the source,
                   V crop variants in CropConfig.variant_names() order, tokens row-major
    labels.npy     (N,) int64 class index; -1 marks an image that could not be read (codes all 0)
    done.npy       (N,) uint8: 0 pending, 1 encoded, 2 skipped; what a resumed run skips
    extract.json   the settings, written once the arrays exist; a resume must match them
    skipped-rank<r>.jsonl   unreadable images and why, appended by each rank as it goes
    files.txt      (image folders) the relative path of each row
    classes.json   class names in label order
    manifest.json  written last, once every row is done: the sign that the folder is usable

Work is cut into batches of `batch_size` consecutive items and batch b goes to rank b % world_size,
so the batches encoded do not depend on the number of ranks, nor on interruptions (an item is
marked done only after its batch's codes are flushed): one process, many processes and a resumed
run give byte-identical arrays. Ranks write disjoint rows of the same memmaps, which assumes they
share one machine's page cache (or a file system with coherent shared mmap writes, not NFS).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image

from npp.codes import CODES_FORMAT, EXTRACT_AGAIN, CodeDataset, open_array
from npp.crops import CropConfig, crop_variants
from npp.data import MNIST_SIZE, ImageFolderSource, ImageSource, MnistSource, to_unit_range
from npp.distributed import Ranks
from npp.errors import DataError, check, is_int
from npp.files import dump_json, write_text
from npp.tokenizer import VQModel
from npp.tokenref import TokenizerRef

PENDING, ENCODED, SKIPPED = 0, 1, 2
SETTINGS_FILE = "extract.json"
ARRAY_FILES = ("codes.npy", "labels.npy", "done.npy")
_LISTING_FILES = ("files.txt", "classes.json")

# What a damaged or foreign image raises while it is opened, decoded or cropped. Anything else is a
# bug and propagates.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def code_dtype(codebook_size: int) -> np.dtype:
    """uint16 holds up to 65,536 codes (LlamaGen's 16,384 included); larger codebooks need int32."""
    return np.dtype(np.uint16 if codebook_size <= 2**16 else np.int32)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def open_source(spec: str) -> ImageSource:
    """'mnist', 'mnist:train' or 'mnist:test' for the embedded digits, otherwise an ImageFolder root."""
    name, _, split = spec.partition(":")
    if name != "mnist":
        return ImageFolderSource(spec)
    if spec == "mnist" and Path(spec).exists():
        raise DataError("'mnist' is both the embedded data set and a folder here: write ./mnist for "
                        "the folder or mnist:train for the embedded digits")
    if split not in ("", "train", "test"):
        raise DataError(f"{spec!r}: the embedded MNIST splits are mnist:train and mnist:test")
    return MnistSource(split or "train")


# ------------------------------------------------------------------------------------------------
# The output folder
# ------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Shapes and settings of one extraction, derived from its inputs."""

    source: ImageSource
    vq: VQModel
    crops: CropConfig

    @property
    def grid(self) -> int:
        return self.crops.size // self.vq.config.downsample

    @property
    def dtype(self) -> np.dtype:
        return code_dtype(self.vq.config.codebook_size)

    @property
    def codes_shape(self) -> tuple[int, int, int]:
        return len(self.source), self.crops.num_variants, self.grid**2

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """dtype and shape of each array file."""
        N = len(self.source)
        return {"codes.npy": (self.dtype, self.codes_shape), "labels.npy": (np.dtype(np.int64), (N,)),
                "done.npy": (np.dtype(np.uint8), (N,))}

    @cached_property
    def fingerprint(self) -> str:
        return self.vq.fingerprint()  # hashes every weight: once per run is enough

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that created the folder (JSON-normalised)."""
        settings = {"format": CODES_FORMAT, "source": self.source.identity(), "crops": self.crops.to_dict(),
                    "tokenizer": self.fingerprint, "codes_shape": list(self.codes_shape),
                    "dtype": self.dtype.name, "vocab_size": self.vq.config.codebook_size}
        return json.loads(json.dumps(settings))


def _prepare_folder(output: Path, layout: _Layout) -> None:
    """Create the arrays (or check that a resumed folder matches): rank 0's job."""
    output.mkdir(parents=True, exist_ok=True)
    settings = layout.settings()
    if (output / SETTINGS_FILE).is_file():
        _check_resumable(output, settings, layout)
        return
    own = {*ARRAY_FILES, *_LISTING_FILES}
    foreign = sorted(n for n in os.listdir(output) if n not in own and not n.startswith(("skipped-rank", ".")))
    if foreign:
        raise DataError(f"{output} is not empty and holds no extraction (it has {foreign[0]}): "
                        f"choose a new or empty output folder")
    for stale in output.glob("skipped-rank*.jsonl"):
        stale.unlink()
    for name, (dtype, shape) in layout.arrays().items():
        open_memmap(output / name, mode="w+", dtype=dtype, shape=shape).flush()  # zero-filled, sparse
    if layout.source.files is not None:
        write_text(output / "files.txt", "".join(f"{f}\n" for f in layout.source.files))
    dump_json(layout.source.classes, output / "classes.json")
    dump_json(settings, output / SETTINGS_FILE)  # last: from here on the folder is resumable


def _stored_settings(output: Path) -> dict[str, Any]:
    """extract.json of a folder being resumed; a damaged one is one line, not a traceback."""
    path = output / SETTINGS_FILE
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        stored = None
    if not isinstance(stored, dict) or not isinstance(stored.get("source"), dict):
        raise DataError(f"{path} is damaged (not the JSON object extraction wrote): the folder cannot be "
                        f"resumed; {EXTRACT_AGAIN}")
    return stored


def _check_resumable(output: Path, settings: dict[str, Any], layout: _Layout) -> None:
    stored = _stored_settings(output)
    changed = [key for key in settings if stored.get(key) != settings[key]]
    if changed:
        raise DataError(f"{output} holds an extraction with other settings ({', '.join(changed)} differ): "
                        f"rerun it with the arguments it was started with, or extract into a new folder")
    for name, (dtype, shape) in layout.arrays().items():
        path = output / name
        array = open_array(path)
        if array.shape != shape or array.dtype != dtype:
            raise DataError(f"{path} is {array.dtype} {array.shape}, this extraction writes {dtype} {shape}: "
                            f"the folder is damaged; {EXTRACT_AGAIN}")


def _check_same_source(output: Path, layout: _Layout, rank: int) -> None:
    """Every rank lists the source itself; rows are only shared if all listings agree with rank 0's."""
    stored = _stored_settings(output)["source"]
    if stored != json.loads(json.dumps(layout.source.identity())):
        raise DataError(f"rank {rank} lists a different source than rank 0 did ({stored['count']} items "
                        f"there, {len(layout.source)} here): the data changed while the ranks started; "
                        f"rerun once it is stable")


@dataclass
class _Arrays:
    codes_NVL: np.memmap
    labels_N: np.memmap
    done_N: np.memmap

    @classmethod
    def open(cls, output: Path) -> _Arrays:
        return cls(*(open_memmap(output / name, mode="r+") for name in ARRAY_FILES))


# ------------------------------------------------------------------------------------------------
# Decoding, cropping and encoding
# ------------------------------------------------------------------------------------------------

class _CropItems(torch.utils.data.Dataset):
    """Item i → (i, its crop variants uint8 (V, 3, S, S) or None, why it could not be read or None)."""

    def __init__(self, source: ImageSource, crops: CropConfig):
        self.source, self.crops = source, crops

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, crop_variants(self.source.open(index), self.crops), None
        except _UNREADABLE as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return index, None, f"{type(err).__name__}: {message}".rstrip(": ")


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    """Batch the readable images; keep the unreadable ones aside with their reasons."""
    rows = [i for i, views, _ in items if views is not None]
    views_nV3SS = torch.stack([views for _, views, _ in items if views is not None]) if rows else None
    failed = [(i, reason) for i, views, reason in items if views is None]
    return rows, views_nV3SS, failed


def _my_batches(done_N: np.ndarray, batch_size: int, ranks: Ranks) -> list[list[int]]:
    """The pending items of this rank's batches: batch b = items [b·B, (b+1)·B), owned by rank b % world."""
    batches = []
    for start in range(ranks.rank * batch_size, len(done_N), ranks.world * batch_size):
        pending = np.flatnonzero(done_N[start:start + batch_size] == PENDING) + start
        if len(pending):
            batches.append(pending.tolist())
    return batches


@torch.no_grad()
def _encode(vq: VQModel, views_nV3SS: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Codes (n, V, h·w) of every variant of n images."""
    n, V = views_nV3SS.shape[:2]
    images_B3SS = to_unit_range(views_nV3SS.flatten(0, 1).to(vq.device))
    codes_Bhw = vq.encode(images_B3SS)
    return codes_Bhw.reshape(n, V, -1).cpu().numpy().astype(dtype)


class _SkipLog:
    """This rank's unreadable images, appended and synced before their rows are marked done."""

    def __init__(self, output: Path, rank: int):
        self.path = output / f"skipped-rank{rank}.jsonl"

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def read_all(output: Path) -> dict[int, dict[str, Any]]:
        """Every rank's records by row (a batch redone after an interruption may repeat one)."""
        records = {}
        for path in sorted(output.glob("skipped-rank*.jsonl")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    records[int(record["index"])] = record
                except (ValueError, KeyError, TypeError):  # a line cut by a crash: its batch was redone
                    continue
        return records


def _write_batch(arrays: _Arrays, source: ImageSource, rows: list[int], codes_nVL: np.ndarray | None,
                 failed: list[tuple[int, str]], skip_log: _SkipLog) -> None:
    """Store one batch; its rows are marked done only after their codes are flushed to the file."""
    if rows:
        arrays.codes_NVL[rows] = codes_nVL
        arrays.labels_N[rows] = source.labels[rows]
    bad = [i for i, _ in failed]
    if bad:
        arrays.codes_NVL[bad] = 0
        arrays.labels_N[bad] = -1
        skip_log.append([{"index": i, "file": source.name(i), "reason": reason} for i, reason in failed])
    arrays.codes_NVL.flush()
    arrays.labels_N.flush()
    arrays.done_N[rows] = ENCODED
    arrays.done_N[bad] = SKIPPED
    arrays.done_N.flush()


# ------------------------------------------------------------------------------------------------
# The extraction
# ------------------------------------------------------------------------------------------------

@dataclass
class ExtractReport:
    """What one call of `extract_codes` did (counts summed over ranks)."""

    directory: Path
    manifest: dict[str, Any]
    encoded: int
    """Images encoded by this run (a resumed run counts only what was left)."""
    skipped: int
    """Images found unreadable by this run."""
    seconds: float

    def summary(self) -> str:
        m = self.manifest
        h, w = m["grid"]
        rate = (self.encoded + self.skipped) / self.seconds if self.seconds > 0 else 0.0
        variants = m["crops"]["count"]
        return (f"{self.directory}: {m['count']} images × {variants} crop{'s' * (variants != 1)} → {h}×{w} codes "
                f"({m['dtype']}, vocab {m['vocab_size']}), {m['valid']} usable, {len(m['skipped'])} skipped; "
                f"this run encoded {self.encoded} and skipped {self.skipped} in {self.seconds:.1f}s "
                f"({rate:.1f} images/s)")


def extract_codes(source: ImageSource, vq: VQModel, output: str | os.PathLike, crops: CropConfig, *,
                  batch_size: int = 8, device: str | torch.device = "cpu", num_workers: int = 0,
                  progress: bool = True, tokenizer_path: str | os.PathLike | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> ExtractReport:
    """Encode every crop variant of every image of `source` into `output` (see the module docstring).

    Resumes an interrupted extraction of the same settings in `output`. Under torchrun/deepspeed
    (WORLD_SIZE > 1) every rank calls this with the same arguments and takes its share of the
    batches. `vq` is moved to `device` (under a launcher, plain 'cuda' means cuda:LOCAL_RANK) and set
    to eval mode. Each batch encodes batch_size × crops.num_variants images. `on_batch(done, total)`
    is called after each batch is stored, with this process's counts. Images that cannot be read
    are skipped (label -1, codes 0) and listed in the manifest with the reason.
    """
    check(is_int(batch_size) and batch_size > 0,
           f"batch_size={batch_size!r}: must be a positive integer (images per batch)")
    check(is_int(num_workers) and num_workers >= 0,
           f"num_workers={num_workers!r}: must be ≥ 0 (0 decodes in the main process)")
    downsample = vq.config.downsample
    check(crops.size % downsample == 0,
           f"CropConfig.size={crops.size} is not a multiple of the tokenizer's downsampling factor "
           f"{downsample}: use an image size such as {max(downsample, crops.size // downsample * downsample)}")
    output = Path(output)
    layout = _Layout(source, vq, crops)
    started = time.perf_counter()
    ranks = Ranks.join()
    try:
        vq.to(ranks.device(device)).eval()
        ranks.on_rank0(lambda: _prepare_folder(output, layout))
        if ranks.rank != 0:
            _check_same_source(output, layout, ranks.rank)
        encoded, skipped = _encode_my_share(layout, output, ranks, batch_size, num_workers, progress, on_batch)
        encoded, skipped = ranks.total(encoded), ranks.total(skipped)
        manifest = ranks.on_rank0(lambda: _finish(output, layout, tokenizer_path))
    finally:
        ranks.leave()
    return ExtractReport(output, manifest, encoded, skipped, time.perf_counter() - started)


def _encode_my_share(layout: _Layout, output: Path, ranks: Ranks, batch_size: int, num_workers: int,
                     progress: bool, on_batch: Callable[[int, int], None] | None) -> tuple[int, int]:
    from tqdm.auto import tqdm

    arrays = _Arrays.open(output)
    batches = _my_batches(arrays.done_N, batch_size, ranks)
    total = sum(len(b) for b in batches)
    loader = torch.utils.data.DataLoader(_CropItems(layout.source, layout.crops), batch_sampler=batches,
                                         num_workers=num_workers, collate_fn=_collate)
    skip_log = _SkipLog(output, ranks.rank)
    encoded = skipped = 0
    # The bar follows rank 0's share; the other ranks work silently at the same pace.
    with tqdm(total=total, unit="img", desc=f"extract ×{layout.crops.num_variants}",
              disable=not progress or ranks.rank != 0) as bar:
        for rows, views_nV3SS, failed in loader:
            codes_nVL = _encode(layout.vq, views_nV3SS, layout.dtype) if rows else None
            _write_batch(arrays, layout.source, rows, codes_nVL, failed, skip_log)
            encoded, skipped = encoded + len(rows), skipped + len(failed)
            bar.update(len(rows) + len(failed))
            if on_batch is not None:
                on_batch(encoded + skipped, total)
    return encoded, skipped


def _finish(output: Path, layout: _Layout, tokenizer_path: str | os.PathLike | None) -> dict[str, Any]:
    """Write manifest.json once every row is done (rank 0's job, after all ranks have finished)."""
    done_N = np.load(output / "done.npy", mmap_mode="r")
    pending = int((done_N == PENDING).sum())
    if pending:
        raise DataError(f"{output}: {pending} rows are still pending after every rank finished; rerun the "
                        f"same command to complete them")
    skipped_rows = set(np.flatnonzero(done_N == SKIPPED).tolist())
    records = {i: r for i, r in _SkipLog.read_all(output).items() if i in skipped_rows}
    if len(records) != len(skipped_rows):
        raise DataError(f"{output}: {len(skipped_rows)} rows are marked skipped but "
                        f"{len(records)} have a recorded reason: the folder is damaged; extract again")
    skipped = [records[i] for i in sorted(records)]
    if len(skipped) == len(layout.source):
        first = skipped[0]
        raise DataError(f"no image of the source could be read (first: {first['file']}: {first['reason']}); "
                        f"check the files, or the crop mode ('none' needs images of exactly the crop size)")
    manifest = _manifest(layout, skipped, tokenizer_path)
    dump_json(manifest, output / "manifest.json")
    return manifest


def _manifest(layout: _Layout, skipped: list[dict[str, Any]], tokenizer_path) -> dict[str, Any]:
    from npp import __version__

    source, crops, vq = layout.source, layout.crops, layout.vq
    return {
        "format": CODES_FORMAT,
        "count": len(source),
        "valid": len(source) - len(skipped),
        "grid": [layout.grid, layout.grid],
        "vocab_size": vq.config.codebook_size,
        "dtype": layout.dtype.name,
        "image_size": crops.size,
        "crops": {**crops.to_dict(), "count": crops.num_variants, "names": crops.variant_names()},
        "tokenizer": TokenizerRef.extracted_with(vq, layout.fingerprint, tokenizer_path).manifest_entry(),
        "classes": list(source.classes),
        "source": source.describe(),
        "files": None if source.files is None else "files.txt",
        "skipped": skipped,
        "npp_version": __version__,
    }


# ------------------------------------------------------------------------------------------------
# The command's options
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractOptions:
    """`npp extract`'s options: its flags are generated from these fields (npp.flags), like every command's."""

    tokenizer: str = ""
    """A shipped tokenizer (mnist-8x8, mnist-16x16), a folder written by VQModel.save_pretrained, or a LlamaGen
    VQ .pt (required)."""
    vq_preset: str | None = None
    """Architecture of a LlamaGen .pt (unset: llamagen-vq16); the VQConfig flags override it."""
    crop: str | None = None
    """Crop variants per image: ten-crop, centre-flip, centre or none (unset: ten-crop for folders; for mnist
    none at its 32 px, centre at any other image size)."""
    crop_ranges: tuple[float, ...] | None = None
    """ten-crop: centre-crop to size·R first, for each R (unset: 1.1 1.05)."""
    image_size: int | None = None
    """Side of every crop in pixels, a multiple of the tokenizer's downsampling: the codes' grid is image size ÷
    downsampling, whatever size the tokenizer was trained at (unset: its image_size; 32 for mnist)."""
    batch_size: int = 8
    """Images per batch; a batch encodes batch-size × crops views."""
    device: str = "auto"
    """torch device, or auto (cuda if available, else cpu); under a launcher 'cuda' means cuda:LOCAL_RANK."""
    workers: int = 2
    """DataLoader processes that decode and crop images (0: the main process)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check(isinstance(self.tokenizer, str) and self.tokenizer != "",
              "--tokenizer is required: a shipped tokenizer (mnist-8x8, mnist-16x16), a save_pretrained folder "
              "or a LlamaGen VQ .pt")

    def crops(self, source: ImageSource, vq: VQModel) -> CropConfig:
        """The crop variants: the embedded digits are already 32×32, so at that size they are encoded as they
        are (one variant); at another size they are resized by the centre crop."""
        digits = isinstance(source, MnistSource)
        size = self.image_size or (MNIST_SIZE if digits else vq.config.image_size)
        mode = self.crop or (("none" if size == MNIST_SIZE else "centre") if digits else "ten-crop")
        return CropConfig(mode, size=size, ranges=self.crop_ranges)

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


def mnist_codes(vq: VQModel, cache_dir: str | os.PathLike, split: str = "train", *, limit: int | None = None,
                batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False) -> CodeDataset:
    """Codes of the embedded MNIST (32 px, one variant) for this tokenizer, extracted once into cache_dir.

    The folder is named after the split, the limit and the tokenizer's fingerprint, so another
    tokenizer never reads stale codes; an interrupted extraction resumes on the next call.
    """
    name = f"mnist-{split}" + (f"-first{limit}" if limit else "") + f"-{vq.fingerprint()[:16]}"
    directory = Path(cache_dir) / name
    if not (directory / "manifest.json").is_file():
        extract_codes(MnistSource(split, limit), vq, directory, CropConfig("none", size=MNIST_SIZE),
                      batch_size=batch_size, device=device, progress=progress)
    return CodeDataset(directory)

