"""What `npp train` does to its run folder before the engine exists: takes the lock, checks that a resumed
run is resumed unchanged, or starts the folder afresh. Neighbours: npp.runs (the folder's layout),
npp.lock (the lock itself), npp.checkpoints (everything under checkpoints/).
"""

from __future__ import annotations

from typing import Callable

from npp.config import TrainConfig
from npp.errors import ConfigError, TrainingError
from npp.lock import RunLock
from npp.runs import RunDir


def lock_run(run: RunDir, rank: int, agree: Callable[[bool], bool]) -> RunLock | None:
    """Rank 0 takes RUN/.lock before anything in the folder is read or written (a second trainer on the
    folder is refused in one line naming the first); every rank learns through `agree` whether it got it.
    Rank 0 then removes what an export interrupted by a kill left. Returns the lock rank 0 took (None elsewhere)."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = run.lock()
            if not lock.acquire("npp train"):
                lock = None  # this process holds it already (a Trainer before this one): it stays held
            run.remove_partial_exports("npp train")
        except TrainingError as err:
            refusal = err
    if not agree(refusal is None):
        raise refusal or TrainingError(f"{run.path} is in use by another process (rank 0 says which)")
    return lock


def resumed_experiment(run: RunDir, config: TrainConfig) -> str:
    """The experiment id of the run being resumed; refused if `config` changes what it was started with."""
    saved = run.read_config()
    changed = config.changes_from(saved)
    # The run's own identity: the same data spelled otherwise (./codes/x/, a symlink) is the same experiment.
    experiment = TrainConfig.from_dict(saved).experiment_id()
    if changed:
        raise ConfigError(f"{run.path} was started with other values of {', '.join(changed)}: resume "
                          f"it unchanged, give a new --name, or pass --no-resume to start it again")
    return experiment


def start_afresh(run: RunDir, config: TrainConfig) -> None:
    """Write the run's config; what an earlier experiment left in the folder is moved aside first, so
    that no later resume can mistake its checkpoints for this run's (nothing is deleted)."""
    moved = run.set_aside()
    if moved is not None:
        print(f"npp train: starting {run.path} again; the files of its previous run are in {moved} "
              f"(delete that folder when you no longer need them)", flush=True)
    run.write_config(config.to_dict())
    run.metrics.unlink(missing_ok=True)
