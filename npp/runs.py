"""Run directories: the contract between the trainer, evaluation, notebooks and the app.

    runs/<name>/
      config.json       the TrainConfig that made the run (enough to resume or rebuild it)
      metrics.jsonl     one JSON object per logged step (step, stage, patch_size, loss, lr, ...), and
                        evaluation rows ("eval": true, fid, is, precision, recall, ...)
      checkpoints/      DeepSpeed checkpoints, one folder per tag, and `latest` naming the newest
      export/           model.safetensors + config.json + tokenizer.json for inference
      samples/          sample grids
      tensorboard/      TensorBoard events

Readers only need this module; they never import DeepSpeed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from npp.config import dump_json


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    # ---- checkpoints -----------------------------------------------------------------------

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint, or None. The pointer is replaced atomically only after
        every file of its checkpoint is written, so a crash mid-save leaves the previous one."""
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if tag and (self.checkpoints / tag).is_dir() else None

    def set_latest(self, tag: str) -> None:
        tmp = self.checkpoints / ".latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, self.checkpoints / "latest")

    def checkpoint_tags(self) -> list[str]:
        """Complete checkpoints, oldest first (tags sort by step)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and (p / "meta.json").is_file())

    # ---- metrics ---------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def train_rows(self) -> list[dict[str, Any]]:
        """The training rows (step, stage, loss, lr, ...), without the evaluation rows."""
        return [row for row in self.read_metrics() if not row.get("eval")]

    def eval_rows(self) -> list[dict[str, Any]]:
        """The periodic evaluation rows (step, fid, is, precision, recall, flops_seen, ...)."""
        return [row for row in self.read_metrics() if row.get("eval")]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after a checkpoint, so a resumed run does not log those steps twice."""
        keep = [row for row in self.read_metrics() if row.get("step", -1) <= after_step]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
        os.replace(tmp, self.metrics)

    def append_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        with open(self.metrics, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_config(self) -> dict[str, Any]:
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.json): "
                                    f"give runs/<name> of a run started with `npp train`")
        return json.loads(self.config.read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        dump_json(config, self.config)
