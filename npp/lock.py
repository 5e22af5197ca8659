"""One writer per run folder: RUN/.lock names the process that trains (or exports) the run.

Two trainers on one folder would interleave their metrics rows and leave checkpoints of two experiments
side by side, and both would exit 0. So the process that writes a run holds RUN/.lock, a small JSON file
naming it (pid, host, command, since when, and the pid's start time, so that a pid the system handed
to another process later is not mistaken for the holder). Another trainer, an export, or an evaluation
that writes into the folder is refused in one line naming the holder.

A lock whose process is gone (same host, the pid no longer runs: a kill -9, a power cut) is taken over
with a warning. A lock written on another host is never taken over: this machine cannot see whether
that process still runs, so the refusal says how to remove it when the user knows it is stale.

Taking and releasing the lock happen under an flock of the run folder itself, so two processes that
start at the same moment (or both find the same stale lock) cannot both win. Under DeepSpeed only
rank 0 holds the lock (npp.train); the lock is released when its holder ends (explicitly, and by an
atexit hook for the paths that end by an exception).
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from npp.errors import TrainingError
from npp.files import write_text

LOCK_NAME = ".lock"


class RunLocked(TrainingError):
    """The run folder is held by another process (or by a lock this host cannot check)."""


@dataclass(frozen=True)
class Holder:
    """What RUN/.lock says about the process that holds it."""

    pid: int
    host: str
    command: str
    since: str
    """When it took the lock, UTC, for people."""
    started: str | None
    """The pid's start time (field 22 of /proc/<pid>/stat) where the system has /proc: a reused pid differs."""
    token: str
    """Unique per acquisition: a process releases only the lock it wrote."""

    def describe(self) -> str:
        command = self.command if len(self.command) <= 80 else self.command[:79] + "…"
        return f"pid {self.pid} on {self.host} since {self.since} ({command})"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_running(self) -> bool:
        """Whether the holder (on this host) still runs: its pid exists, is not a zombie, and started when
        the lock says (a pid reused by another process is not the holder)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, owned by someone else
        state, started = _proc_stat(self.pid)
        if state == "Z":  # ended, not yet reaped by its parent: it writes nothing any more
            return False
        return self.started is None or started is None or started == self.started


def _proc_stat(pid: int) -> tuple[str | None, str | None]:
    """(state, start time) of a process from /proc, or (None, None) where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


class RunLock:
    """RUN/.lock: `acquire` takes it for this process (or refuses in one line), `release` gives it back."""

    _held: dict[Path, "RunLock"] = {}
    """Locks this process holds, by run folder: a trainer's own export does not lock against itself."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token: str | None = None
        self._made: list[Path] = []
        """The folders taking the lock created (the run folder, missing parents), deepest first."""

    # ---- reading -----------------------------------------------------------------------------

    def holder(self) -> Holder | None:
        """Who holds the lock, or None. A lock file that is not ours to read is refused, not guessed at."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise RunLocked(f"{self.path} cannot be read ({err}): if no npp process is writing into {self.run_dir}, "
                            f"delete {self.path}") from None
        try:
            data = json.loads(text)
            return Holder(int(data["pid"]), str(data["host"]), str(data["command"]), str(data["since"]),
                          data.get("started"), str(data["token"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise RunLocked(f"{self.path} is not a lock npp wrote: if no npp process is writing into {self.run_dir}, "
                            f"delete {self.path}") from None

    def check_free(self) -> Holder | None:
        """Refuse (RunLocked) if another live process holds the lock, or one on another host; return the
        holder of a stale lock (its process is gone) without touching it, None when there is none or the
        holder is this process."""
        holder = self.holder()
        if holder is None or self._is_this_process(holder):
            return None
        if not holder.on_this_host():
            raise RunLocked(f"{self.run_dir} is locked by {holder.describe()}: this machine cannot see whether that "
                            f"process still runs; if you know it has ended, delete {self.path} and run this again")
        if holder.is_running():
            raise RunLocked(f"{self.run_dir} is in use by {holder.describe()}: wait for it to finish, or stop it "
                            f"(kill {holder.pid}; a trainer saves a checkpoint and resumes with the same command), "
                            f"then run this again")
        return holder

    # ---- taking and giving back ------------------------------------------------------------------

    def acquire(self, prog: str) -> bool:
        """Take the lock for this process; False when this process already holds it (nothing to release
        then). Raises RunLocked naming the holder; a stale lock is taken over with a warning on stderr."""
        if self._is_held_here():
            return False
        try:
            self._made = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with _folder_flock(self.run_dir):
                stale = self.check_free()
                if stale is not None:
                    print(f"{prog}: warning: {self.run_dir} was locked by {stale.describe()}, which is no longer "
                          f"running; taking the lock over", file=sys.stderr, flush=True)
                self.token = uuid.uuid4().hex
                write_text(self.path, json.dumps(asdict(self._me())) + "\n")
        except OSError as err:
            self.token = None
            raise TrainingError(f"{self.run_dir} cannot be locked for writing ({err.strerror or err}): choose another "
                                f"--runs-dir or --name, or make the folder writable") from None
        RunLock._held[self._key()] = self
        atexit.register(self.release)
        return True

    def release(self) -> None:
        """Remove the lock if this process wrote it (never another's); safe to call twice."""
        if self.token is None:
            return
        RunLock._held.pop(self._key(), None)
        try:
            with _folder_flock(self.run_dir):
                holder = self.holder()
                if holder is not None and holder.token == self.token:
                    self.path.unlink()
        except (OSError, RunLocked):
            pass  # the folder went away or was replaced: nothing of ours is left to remove
        self.token = None
        for folder in self._made:  # a command refused before it wrote anything leaves no empty run folder
            try:
                folder.rmdir()  # only if empty: nothing anyone wrote is removed
            except OSError:
                break
        self._made = []

    @contextmanager
    def held(self, prog: str) -> Iterator[None]:
        """Hold the lock for a block; a lock this process already holds is kept, not released, at the end."""
        taken = self.acquire(prog)
        try:
            yield
        finally:
            if taken:
                self.release()

    # ---- helpers ----------------------------------------------------------------------------------

    def _me(self) -> Holder:
        assert self.token is not None
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
        return Holder(os.getpid(), socket.gethostname(), command[:200], time.strftime("%Y-%m-%d %H:%M:%S UTC",
                      time.gmtime()), _proc_stat(os.getpid())[1], self.token)

    def _key(self) -> Path:
        return self.run_dir.resolve()

    def _is_held_here(self) -> bool:
        held = RunLock._held.get(self._key())
        return held is not None and held.token is not None

    def _is_this_process(self, holder: Holder) -> bool:
        return holder.on_this_host() and holder.pid == os.getpid()


@contextmanager
def _folder_flock(folder: Path) -> Iterator[None]:
    """An exclusive flock of the folder for the few reads and writes of taking or giving back the lock."""
    try:
        import fcntl
    except ImportError:  # no flock on this system: the lock file alone
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
