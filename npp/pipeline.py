"""A GPT and the tokenizer that decodes its codes, behind one call (the diffusers habit).

    pipe = npp.Pipeline.from_run("runs/quickstart-npp")              # a run directory or its export
    pipe = npp.Pipeline.from_llamagen("c2i_B_256.pt", "vq_ds16_c2i.pt")
    images_BHW3 = pipe(labels_B, npp.PAPER_SAMPLER, generator=[...])  # uint8, or output="pil" / "codes"

Every place that turns labels into pictures (the quickstart, evaluation, the benchmarks, the notebooks,
the app) goes through this class, so sampling and decoding are written once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from npp.config import SamplerConfig
from npp.errors import ConfigError, check, check_device, is_int, require
from npp.model import GPT
from npp.runs import RunDir
from npp.sampling import StepCallback, SteppedSampler, generate
from npp.tokenizer import VQModel, load_tokenizer, to_uint8
from npp.tokenref import TokenizerRef
from npp.weights import file_sha256, fingerprint

OUTPUTS = ("uint8", "pil", "codes")


def export_folder(path: str | os.PathLike) -> Path:
    """The export folder of a run directory (runs/<name>/export) or the folder itself, or a one-line error."""
    path, run = Path(path), RunDir(path)
    export = run.export if run.exported else path
    if not (export / "model.safetensors").is_file():
        hint = (f" (a run without export: run `npp export {path}` first)"
                if (path / "config.json").is_file() and (path / "checkpoints").is_dir() else "")
        raise ConfigError(f"{path}: not a run directory or an export folder{hint}; give runs/<name> "
                          f"or a folder written by GPT.save_pretrained")
    return export


class Pipeline:
    """Labels in, images out: `generate` with a sampler, then the tokenizer's decoder."""

    def __init__(self, model: GPT, vq: VQModel, *, tokenizer_info: TokenizerRef | None = None,
                 export: Path | None = None):
        check(vq.config.codebook_size == model.config.vocab_size,
              f"the tokenizer has {vq.config.codebook_size} codes but the model predicts "
              f"{model.config.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
        # Modes are left as they are: the trainer's periodic evaluation samples its model mid-training
        # (generate() switches to eval mode for the sampling and back).
        self.model, self.vq = model, vq
        self.tokenizer_info = tokenizer_info or TokenizerRef()
        """The export's tokenizer.json: which data and tokenizer the codes come from."""
        self.export = export
        """The export folder it was loaded from (None for .pt checkpoints)."""
        self._tokenizer_fingerprint: str | None = None

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_run(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> "Pipeline":
        """A run directory (runs/<name>) or its export folder, with the tokenizer its export names;
        `tokenizer` stands in for that one's path, and its fingerprint must match."""
        check_device(device)  # before anything is read: a missing GPU is not a damaged file
        export = export_folder(path)
        info = TokenizerRef.read(export / "tokenizer.json", override=tokenizer)
        model = GPT.from_pretrained(export, device=device)
        vq = info.load(override=tokenizer, where=str(export)).to(device)
        return cls(model, vq, tokenizer_info=info, export=export)

    @classmethod
    def from_llamagen(cls, gpt_pt: str | os.PathLike, vq: str | os.PathLike, *, grid: int | None = None,
                      image_size: int | None = None, n_head: int | None = None,
                      device: str | torch.device = "cpu", **vq_architecture: Any) -> "Pipeline":
        """A LlamaGen/NPP GPT .pt and its tokenizer (a LlamaGen VQ .pt, described by `vq_architecture`
        when it is not VQ-16, or a save_pretrained folder). Heads and grid are the GPT file's own
        (GPT.from_llamagen: explicit n_head/grid/image_size win, else the preset table, its stored training
        arguments, its file name), never the tokenizer's default size; `image_size` is divided by the
        tokenizer's downsampling. `pipe.model.inferred` says what was inferred and from where."""
        tokenizer = load_tokenizer(vq, **vq_architecture)
        check(grid is None or image_size is None, "give grid= or image_size=, not both")
        if image_size is not None:
            down = tokenizer.config.downsample
            check(is_int(image_size) and image_size > 0 and image_size % down == 0,
                  f"image_size={image_size!r}: must be a positive multiple of the tokenizer's downsampling {down}")
            grid = image_size // down
        model = GPT.from_llamagen(gpt_pt, n_head=n_head, grid=grid)
        return cls(model.to(device), tokenizer.to(device))

    def to(self, device: str | torch.device) -> "Pipeline":
        self.model.to(device)
        self.vq.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def grid(self) -> int:
        return self.model.config.grid

    @property
    def image_size(self) -> int:
        return self.grid * self.vq.config.downsample

    @property
    def on_embedded_data(self) -> bool:
        return self.tokenizer_info.on_embedded_data

    def weights_sha256(self) -> str:
        """Names the exact weights that draw: the sha256 of the export's model.safetensors (verified when it
        was loaded), or, for a model not loaded from an export, the fingerprint of its state dict."""
        if self.export is not None:
            return file_sha256(self.export / "model.safetensors")
        return fingerprint(self.model)

    def tokenizer_fingerprint(self) -> str:
        """The tokenizer's fingerprint, computed once (it hashes every weight of the decoder)."""
        if self._tokenizer_fingerprint is None:
            self._tokenizer_fingerprint = self.vq.fingerprint()
        return self._tokenizer_fingerprint

    def identity(self) -> dict[str, Any]:
        """What names the model in results: its export, weights hash, config, data and tokenizer."""
        identity: dict[str, Any] = {"config": self.model.config.to_dict(), "data": self.tokenizer_info.data,
                                    "tokenizer_fingerprint": self.tokenizer_fingerprint()}
        if self.export is not None:
            identity.update(export=str(self.export.resolve()),
                            model_sha256=file_sha256(self.export / "model.safetensors"))  # hashed once, when loaded
            source = self.export / "source.json"
            if source.is_file():
                identity["source"] = json.loads(source.read_text())
        return identity

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, labels_B: torch.Tensor | Sequence[int], sampler: SamplerConfig | None = None, *,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, progress: bool = False,
                 output: str = "uint8", callback: StepCallback | None = None, **knobs: Any) -> Any:
        """Sample one image per label and decode it.

        output: "uint8" (B, H, W, 3) uint8 tensor on the CPU, "pil" a list of PIL images, "codes" the
        token grids (B, grid, grid). Sampling arguments are those of npp.generate.
        """
        check(output in OUTPUTS, f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
        tokens_BL = generate(self.model, torch.as_tensor(labels_B), sampler, generator=generator,
                             progress=progress, callback=callback, **knobs)
        codes_Bhw = tokens_BL.view(-1, self.grid, self.grid)
        if output == "codes":
            return codes_Bhw
        images_BHW3 = self.decode(codes_Bhw)
        if output == "pil":
            image = require("PIL.Image", "output='pil'")
            return [image.fromarray(array) for array in images_BHW3.numpy()]
        return images_BHW3

    def stepped(self, labels_B: torch.Tensor | Sequence[int], sampler: SamplerConfig | None = None, *,
                generator: Sequence[torch.Generator], warm_rows: int = 0) -> SteppedSampler:
        """Sampling paused after every token row, for callers that show or interleave rows (the app's two
        models drawing in turns): each `advance()` samples one more row of the grid and returns every token
        so far, (B, T) on the CPU (`decode_rows` shows them); `close()` stops early. The tokens are those of
        `self(labels_B, sampler, generator=generator, output="codes")`: the same loop, paused. One generator
        per label; `warm_rows` rows are first sampled and thrown away, with generators of their own."""
        return SteppedSampler(self.model, torch.as_tensor(labels_B), sampler or SamplerConfig(), list(generator),
                              every=self.grid, warm_rows=warm_rows)

    @torch.no_grad()
    def decode(self, codes_Bhw: torch.Tensor) -> torch.Tensor:
        """Token grids (B, h, w) to uint8 pixels (B, h·d, w·d, 3) on the CPU, as LlamaGen saves samples."""
        return to_uint8(self.vq.decode(codes_Bhw.to(self.vq.device)))

    def decode_rows(self, tokens_BT: torch.Tensor) -> np.ndarray:
        """Images (B, H, W, 3) uint8 of the complete token rows so far; rows not generated yet stay black.

        Only real tokens are decoded (no placeholder codes below the frontier), so a preview never shows
        invented content; the decoder's convolutions see a shorter latent, so the last preview row can
        differ slightly from the final image (the full grid, decoded by `decode`).
        """
        B, T = tokens_BT.shape
        rows, down = T // self.grid, self.vq.config.downsample
        images_BHW3 = np.zeros((B, self.image_size, self.image_size, 3), dtype=np.uint8)
        if rows:
            images_BHW3[:, :rows * down] = self.decode(tokens_BT[:, :rows * self.grid].reshape(B, rows, self.grid)).numpy()
        return images_BHW3

