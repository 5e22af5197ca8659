"""What the trainer reads: a run's codes, and which of them each step trains on.

The order is a pure function of (seed, step, rank), so a resumed run continues exactly where the
interrupted one was, without replaying data, on any number of processes.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from npp.codes import CodeDataset
from npp.config import cache_dir
from npp.distributed import is_rank0
from npp.errors import ConfigError
from npp.tokenizer import EMBEDDED_TOKENIZERS, load_embedded_tokenizer


def open_data(spec: str, seed: int) -> CodeDataset:
    """An embedded data set by name (its codes extracted once into the cache) or an `npp extract` folder."""
    if spec in EMBEDDED_TOKENIZERS:
        from npp.extract import mnist_codes

        # Extracted once (all ranks share the work), then read from the cache by every later run.
        return CodeDataset(mnist_codes(load_embedded_tokenizer(spec), cache_dir() / "codes", "train",
                                       progress=is_rank0()).directory, seed=seed)
    if not os.path.isdir(spec):
        raise ConfigError(f"TrainConfig.data={spec!r} is neither an embedded data set "
                          f"({', '.join(EMBEDDED_TOKENIZERS)}) nor a folder: give a folder written by npp extract")
    return CodeDataset(spec, seed=seed)


class GlobalOrder:
    """Which items each step trains on: sample k of the run (k = step · batch + j) is item
    perm_e[k mod N] of epoch e = k // N, with perm_e a permutation seeded by (seed, e).

    A pure function of the step, the same for any number of processes: rank r of W takes the r-th
    W-th of every global batch. Resuming needs nothing but the step.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_items))
        return self._perm[1]

    def items(self, step: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
        """(item index, epoch) pairs of this rank's share of the global batch of `step`."""
        share = self.batch_size // world
        first = step * self.batch_size + rank * share
        pairs = []
        for k in range(first, first + share):
            epoch = k // self.num_items
            pairs.append((int(self.permutation(epoch)[k % self.num_items]), epoch))
        return pairs


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of (index, epoch) pairs from start_step to the end of the run."""

    def __init__(self, order: GlobalOrder, start: int, end: int, rank: int, world: int, micro: int):
        self.order, self.start, self.end = order, start, end
        self.rank, self.world, self.micro = rank, world, micro

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            pairs = self.order.items(step, self.rank, self.world)
            for i in range(0, len(pairs), self.micro):
                yield pairs[i:i + self.micro]

    def __len__(self) -> int:
        return (self.end - self.start) * (self.order.batch_size // self.world // self.micro)


class EpochItems(torch.utils.data.Dataset):
    """Serves (index, epoch) pairs: the epoch chooses the crop variant (see CodeDataset)."""

    def __init__(self, data: CodeDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = pair
        return self.data.item(index, epoch)


def micro_batches(data: CodeDataset, order: GlobalOrder, start: int, end: int, *, rank: int, world: int,
                  micro: int, num_workers: int, pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens_BL, labels_B) micro-batches of this rank from step `start` to `end`, in order."""
    loader = torch.utils.data.DataLoader(EpochItems(data), batch_sampler=StepBatches(order, start, end, rank, world,
                                                                                   micro),
                                         num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)
