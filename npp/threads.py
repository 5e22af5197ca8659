"""The CPU thread count of a process: a recorded setting, because it changes the numbers.

A matrix product summed over one thread or over two adds its terms in another order, so a seed's run
trained with one thread ends elsewhere than with two (on the embedded data its FID moved by 15–24
points). Every command that computes therefore sets the count before any work and records the count in
force, so that runs computed with different counts are never compared as if they were one recipe.
"""

from __future__ import annotations

from npp.errors import check, is_int

THREADS_DOC = ("CPU threads for torch's operators (torch.set_num_threads). Recorded with the results, since "
               "another count changes the numbers. Default: the count the process would use anyway, "
               "OMP_NUM_THREADS if set, else torch's (one per core), so that an existing command line or "
               "environment keeps computing what it computed.")


def check_threads(value: int | None, where: str) -> None:
    """None (the process's default) or a whole number ≥ 1."""
    check(value is None or (is_int(value) and value >= 1),
          f"{where}={value!r}: give a whole number of threads ≥ 1 (or leave it out for the process's default)")


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count (None keeps the process's) and return the count now in force.

    Inter-op threads are left alone: npp runs no parallel graph (no TorchScript fork/wait), and torch refuses
    to change them once any parallel work has started, which a second command in one process would hit."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()
