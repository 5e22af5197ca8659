"""The README is the user's contract: every command of its ```bash blocks, and of the pages it sends users to
(docs/usage.md, docs/results/README.md), runs in a test exactly as written.

Each command is listed in COMMANDS with how it is checked:

- "run": executed as written (through bash, papermill's own command line included) in a scratch working
  directory laid out like a fresh clone after `make quickstart`: the repository's files, .venv, and
  runs/quickstart-ntp and runs/quickstart-npp trained by the real trainer with the quickstart recipe and
  the same names, at 12 steps instead of 1,200, then evaluated on a few samples. Nothing else is
  prepared (no out/ folder, no data), so a command that needs more than the README gives fails here.
- "help": commands that need GPUs, ImageNet, a cluster, or that serve forever. Their program's `--help`
  (or `papermill --help-notebook`, or `make -n`) must succeed and list every option the README gives
  it, the launcher's options too (`deepspeed --help`, `torchrun --help`), and the repository files
  they name must exist.
- "heavy": run exactly as written, but only with `-m heavy` (`make test-heavy`), in a scratch folder
  of their own; the default suite still checks their options against their program's `--help`.

A README command that is not in COMMANDS (or an entry the README no longer has) fails
test_every_readme_command_is_classified, so the README cannot grow an untested command.
Only the ```bash blocks are the contract; the ```python snippets and commands quoted in prose are not.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import study

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_PAGE = ROOT / "docs" / "results" / "README.md"
DOCS = (README, ROOT / "docs" / "usage.md", RESULTS_PAGE)
"""Where the user's commands are: the README and the pages it sends them to."""
GENERATED = {"summary": "docs/results/study/summary.md", "draws": "docs/results/study/draws.md"}
"""Results blocks that are one generated file of benchmarks/study.py rather than a folder's results.md."""
BIN = Path(sys.executable).parent
# The codes of the 60,000 embedded training digits and the reference features are derived once and reused.
CACHE = "/tmp/npp-cache"
LAUNCHERS = ("deepspeed", "torchrun")


# ---- the README's commands -----------------------------------------------------------------------

def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, at the start or after a blank)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks: continuation lines joined, comment-only lines skipped."""
    commands = []
    for block in re.findall(r"^[ \t]*```bash[ \t]*\n(.*?)^[ \t]*```", text, re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = f"{pending} {raw.strip()}" if pending else raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
                continue
            line = strip_comment(line)
            if line:
                commands.append(line)
        assert not pending, f"README: a bash block ends with a continuation line: {pending!r}"
    return commands


@dataclass(frozen=True)
class Check:
    kind: str  # "run", "help" or "heavy"
    help: tuple[str, ...] = ()  # run in the scratch folder; they must succeed and list the command's options
    why: str = ""  # why the command is not run in the default suite
    after_quickstart: bool = False  # heavy: needs the quickstart pair of `make quickstart`


TRAIN_HELP = ("python npp/train.py --help",)
GPUS = "needs 8 GPUs and ImageNet codes"

COMMANDS: dict[str, Check] = {
    # Quickstart
    "make quickstart": Check("heavy", ("make -n quickstart",), "trains the 1,200-step pair (~10 min on 2 cores)"),
    # Set-up and tests
    "make test": Check("help", ("make -n test",), "runs the whole suite, this module included"),
    # Results: the study's sets of runs (hours each on 2 cores; finished runs are reused)
    "make reproduce": Check("help", ("make -n reproduce", "python benchmarks/reproduce.py --help"),
                            "the default set: 9 runs of the quickstart's size, about an hour"),
    **{s.command: Check("help", ("make -n reproduce", "python benchmarks/reproduce.py --help"),
                        "a set of the study: up to 2 h on 2 cores") for s in study.SETS if s is not study.DEFAULT},
    "python benchmarks/study.py": Check("help", ("python benchmarks/study.py --help",),
                                        "reads the study's runs, which take hours to train"),
    # Training at every scale
    "npp train --name ntp-tiny --model tiny --data mnist-8x8 --schedule.levels 1 --schedule.total-steps 3000":
        Check("heavy", ("npp train --help",), "3,000 steps"),
    "npp train --name npp-tiny --model tiny --data mnist-8x8 --schedule.levels 2 --schedule.segment-factor 0.5 "
    "--schedule.total-steps 3000":
        Check("heavy", ("npp train --help",), "3,000 steps"),
    "deepspeed --num_gpus 8 npp/train.py --deepspeed ds_configs/zero2.json --recipe paper --model L "
    "--data codes/imagenet256 --name npp-l":
        Check("help", TRAIN_HELP, GPUS),
    "deepspeed --num_gpus 8 npp/train.py --deepspeed ds_configs/zero2.json --recipe paper --model L "
    "--data codes/imagenet256 --name ntp-l --schedule.levels 1":
        Check("help", TRAIN_HELP, GPUS),
    "torchrun --nproc_per_node 8 npp/train.py --deepspeed ds_configs/zero2.json --recipe llamagen --model L "
    "--data codes/imagenet256 --name llamagen-l":
        Check("help", TRAIN_HELP, GPUS),
    "deepspeed --hostfile hostfile --master_addr node1 npp/train.py --deepspeed ds_configs/zero2.json "
    "--recipe paper --model XXL --data codes/imagenet256 --name npp-xxl --activation-checkpointing":
        Check("help", TRAIN_HELP, "needs a cluster and ImageNet codes"),
    # The released checkpoints (tests/test_llamagen_zoo.py runs every convert of the zoo table against stand-ins)
    "npp convert c2i_L_384.pt runs/c2i_L_384/export":
        Check("help", ("npp convert --help",), "needs LlamaGen's c2i_L_384.pt (run against a stand-in of that name "
                                               "in tests/test_llamagen_zoo.py)"),
    "npp evaluate runs/c2i_L_384 --tokenizer vq_ds16_c2i.pt --num-samples 50000 --labels random "
    "--reference imagenet/val --inception-weights weights-inception-2015-12-05-6726825d.pth --export-npz":
        Check("help", ("npp evaluate --help",), "needs LlamaGen's GPT-L and tokenizer, ImageNet and the Inception weights"),
    # Evaluation
    "npp evaluate runs/quickstart-npp --num-samples 10000":
        Check("heavy", ("npp evaluate --help",), "10,000 samples (~7 min of CPU)", after_quickstart=True),
    "npp evaluate runs/npp-l --num-samples 50000 --labels random --cfg-scale 2.0 --reference imagenet/val "
    "--inception-weights weights-inception-2015-12-05-6726825d.pth --export-npz":
        Check("help", ("npp evaluate --help",), "needs a trained GPT-L, ImageNet and the Inception weights"),
    "torchrun --nproc_per_node 8 -m npp.evaluate runs/npp-l --num-samples 50000 --reference imagenet/val ...":
        Check("help", ("python -m npp.evaluate --help",), "needs 8 GPUs, a trained GPT-L and ImageNet"),
    # Notebooks
    "mkdir -p out": Check("run"),
    "papermill notebooks/train.ipynb out/train.ipynb":
        Check("heavy", ("papermill --help-notebook notebooks/train.ipynb",),
              "reuses the 1,200-step quickstart pair only: trains it otherwise", after_quickstart=True),
    "papermill notebooks/train.ipynb out/xxl.ipynb -p model XXL -p data codes/imagenet256 "
    "-p deepspeed_config ds_configs/zero2.json -p num_gpus 8 -p activation_checkpointing True -p eval_every 5000":
        Check("help", ("papermill --help-notebook notebooks/train.ipynb",), GPUS),
    "papermill notebooks/patches.ipynb out/patches.ipynb -p run runs/quickstart-npp": Check("run"),
    "papermill notebooks/attention.ipynb out/attention.ipynb -p class_label 7 -p layer 2 -p head 1": Check("run"),
    """papermill notebooks/fid.ipynb out/fid.ipynb -p runs '["runs/quickstart-ntp", "runs/quickstart-npp"]'""":
        Check("run"),
    # The app
    "make app": Check("help", ("make -n app", "python app/demo.py --help"), "serves until stopped"),
    "python app/demo.py --runs runs/ --checkpoint c2i_B_256.pt npp_B.pt --tokenizer vq_ds16_c2i.pt --port 7860":
        Check("help", ("python app/demo.py --help",), "needs the LlamaGen/NPP checkpoints; serves until stopped"),
    # Data and tokenizers
    "npp extract imagenet/train codes/imagenet256 --tokenizer vq_ds16_c2i.pt --image-size 256 --device cuda":
        Check("help", ("npp extract --help",), "needs ImageNet, LlamaGen's tokenizer and a GPU"),
    "torchrun --nproc_per_node 8 -m npp.cli extract imagenet/train codes/imagenet256 --tokenizer vq_ds16_c2i.pt":
        Check("help", ("python -m npp.cli extract --help",), "needs 8 GPUs, ImageNet and LlamaGen's tokenizer"),
}


def ids(commands: dict[str, Check], kinds: tuple[str, ...]) -> list:
    marks = {"heavy": [pytest.mark.heavy, pytest.mark.timeout(7200)]}
    return [pytest.param(command, id=re.sub(r"[^\w.-]+", "_", command)[:80],
                         marks=marks.get(check.kind, []) if kinds == ("heavy",) else [])
            for command, check in commands.items() if check.kind in kinds]


def test_readme_parser_joins_continuations_and_strips_comments():
    text = ("```bash\n# a comment line\nmake a   # its comment\ncmd --x 1 \\\n    --y '#not a comment'\n```\n"
            "  ```bash\n  indented --block\n  ```\n```python\nnot = 'bash'\n```\n")
    assert readme_commands(text) == ["make a", "cmd --x 1 --y '#not a comment'", "indented --block"]


def test_options_are_split_between_launcher_and_program():
    launcher, program = split_launcher(shlex.split("deepspeed --num_gpus 8 npp/train.py --deepspeed z.json --model L"))
    assert options(launcher) == ["--num_gpus"] and options(program) == ["--deepspeed", "--model"]
    assert split_launcher(["torchrun", "--nnodes", "1", "-m", "npp.cli", "extract", "--x"])[1] == ["extract", "--x"]
    assert listed("--model", "[--model STR] [--model-overrides JSON]") and not listed("--mode", "[--model STR]")
    assert not listed("--model", "[--model-overrides JSON]")
    assert options(["papermill", "a", "b", "-p", "run", "x"]) == ["-p run"] and listed("-p run", "  run: str (default")
    assert options(shlex.split('make reproduce REPRODUCE_ARGS="--width 48 --seeds 0 1"')) == ["--width", "--seeds"]


def documented_commands() -> list[str]:
    return [c for doc in DOCS for c in readme_commands(doc.read_text())]


def test_the_study_block_lists_the_studys_sets_in_order():
    """benchmarks/study.py's SETS are the one home of the study's commands; the results page shows them as they are."""
    commands = readme_commands(RESULTS_PAGE.read_text())
    shown = [c for c in commands if c.startswith("make reproduce") or c == "python benchmarks/study.py"]
    assert shown == [s.command for s in study.SETS] + ["python benchmarks/study.py"]


def test_every_readme_command_is_classified():
    commands = documented_commands()
    assert len(commands) == len(set(commands)), "a command is documented twice: give it one home"
    unclassified = [c for c in commands if c not in COMMANDS]
    assert not unclassified, ("README commands that no test runs; classify each in tests/test_readme.py "
                              "COMMANDS (run, help or heavy):\n" + "\n".join(unclassified))
    gone = [c for c in COMMANDS if c not in commands]
    assert not gone, "COMMANDS lists commands the README no longer has:\n" + "\n".join(gone)
    assert {check.kind for check in COMMANDS.values()} <= {"run", "help", "heavy"}
    assert all(check.help and check.why for check in COMMANDS.values() if check.kind != "run")


# ---- the scratch folders ------------------------------------------------------------------------

def clone_layout(folder: Path) -> Path:
    """The repository's tracked files and its .venv, as links: relative paths of the README resolve, and
    what the commands write (runs/, out/) stays in the scratch folder."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = {line.split("/")[0] for line in listed.stdout.splitlines()} if listed.returncode == 0 else \
        {p.name for p in ROOT.iterdir()} - {".git", "runs", "out", ".pytest_cache", "__pycache__"}
    for name in sorted(names | {".venv"}):
        if (ROOT / name).exists():
            (folder / name).symlink_to(ROOT / name)
    return folder


def environment(*, threads: int | None = 1, activated: bool = True) -> dict[str, str]:
    """The user's shell with the project's .venv activated (the README's `npp`, `papermill` and `python`)."""
    env = {**os.environ, "NPP_CACHE": CACHE, "PYTHONUNBUFFERED": "1"}
    if activated:
        env |= {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(BIN.parent)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def bash(command: str, cwd: Path, *, timeout: float, threads: int | None = 1) -> subprocess.CompletedProcess:
    """`make` runs from a plain shell (it makes the .venv); the README's other commands need it activated."""
    env = environment(threads=threads, activated=not command.startswith("make "))
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def failure(command: str, cwd: Path, done: subprocess.CompletedProcess) -> str:
    return (f"README command failed as written (exit {done.returncode}) in {cwd}:\n  {command}\n"
            f"--- stdout (end)\n{done.stdout[-1500:]}\n--- stderr (end)\n{done.stderr[-3000:]}")


def wait_all(processes: dict[str, subprocess.Popen], cwd: Path, timeout: float) -> None:
    try:
        for command, process in processes.items():
            out, err = process.communicate(timeout=timeout)
            done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
            assert done.returncode == 0, failure(command, cwd, done).replace("README command", "preparation")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def readme_cwd(tmp_path_factory) -> Path:
    """A fresh clone after `make quickstart`, cheaply: the quickstart pair trained by the real trainer with
    the quickstart recipe and the same names at 12 steps, exported, and evaluated on 20 samples each."""
    cwd = clone_layout(tmp_path_factory.mktemp("readme"))
    levels = {"quickstart-ntp": 1, "quickstart-npp": 2}
    # Started as the rest of the suite starts the trainer (sys.executable, the caller's PATH): DeepSpeed
    # JIT-builds its CPU comm op with the first ninja on PATH, and the .venv's ninja and the system's log
    # their builds differently, so switching between them rebuilds the op (minutes on 2 cores).
    start = lambda args: subprocess.Popen([sys.executable, "-m", *args], cwd=cwd,  # noqa: E731
                                          env=environment(activated=False), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    runs = {name: ["npp.train", "--recipe", "quickstart", "--name", name, "--schedule.levels", str(n),
                   "--schedule.total-steps", "12", "--progress", "false"] for name, n in levels.items()}
    wait_all({" ".join(args): start(args) for args in runs.values()}, cwd, timeout=1500)
    evaluations = [["npp.cli", "evaluate", f"runs/{name}", "--num-samples", "20", "--progress", "false"]
                   for name in levels]
    wait_all({" ".join(args): start(args) for args in evaluations}, cwd, timeout=600)
    return cwd


@pytest.fixture(scope="module")
def heavy_cwd(tmp_path_factory) -> Path:
    # `make quickstart` re-installs when .venv is older than pyproject.toml or the Makefile; run from a
    # scratch folder that would make the editable install point at it, so the set-up must be current.
    current = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True)
    if current.returncode != 0:
        pytest.fail("the .venv is older than pyproject.toml or the Makefile: run `make setup` first "
                    "(make test-heavy does)")
    return clone_layout(tmp_path_factory.mktemp("readme-heavy"))


@pytest.fixture(scope="module")
def quickstarted(heavy_cwd) -> subprocess.CompletedProcess:
    """`make quickstart`, exactly as the README gives it, once per module."""
    return bash("make quickstart", heavy_cwd, timeout=6000, threads=None)


# ---- the checks ---------------------------------------------------------------------------------

@pytest.mark.timeout(3000)
@pytest.mark.parametrize("command", ids(COMMANDS, ("run",)))
def test_run_command_exits_0_as_written(command, readme_cwd):
    done = bash(command, readme_cwd, timeout=900)
    assert done.returncode == 0, failure(command, readme_cwd, done)
    argv = shlex.split(command)
    if argv[0] == "papermill":
        assert (readme_cwd / argv[2]).is_file()


def split_launcher(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, program arguments) of `deepspeed ... npp/train.py ARGS` or `torchrun ... -m MOD ARGS`."""
    if argv[0] not in LAUNCHERS:
        return [], argv
    for i, token in enumerate(argv):
        if token.endswith(".py"):
            return argv[:i], argv[i + 1:]
        if token == "-m":
            return argv[:i], argv[i + 2:]
    raise AssertionError(f"no program in {argv}")


def options(argv: list[str]) -> list[str]:
    """The --options of a command line, those inside a make variable (REPRODUCE_ARGS="--width 48 …"), and
    the -p parameter names of papermill's."""
    named = [token.split("=")[0] for token in argv if token.startswith("--")]
    for token in argv:
        if re.match(r"[A-Z_]+=", token):
            named += options(shlex.split(token.split("=", 1)[1]))
    return named + [f"-p {argv[i + 1]}" for i, token in enumerate(argv[:-1]) if token == "-p"]


def listed(option: str, text: str) -> bool:
    if option.startswith("-p "):  # papermill --help-notebook: "  name: type (default ...)"
        return re.search(rf"^\s+{re.escape(option[3:])}: ", text, re.M) is not None
    return re.search(rf"(?<![\w.-]){re.escape(option)}(?![\w-])", text) is not None


HELP_OUTPUT: dict[str, str] = {}


def help_text(command: str, cwd: Path) -> str:
    if command not in HELP_OUTPUT:
        done = bash(command, cwd, timeout=300)
        assert done.returncode == 0, failure(command, cwd, done).replace("README command", "help/dry-run")
        HELP_OUTPUT[command] = done.stdout + done.stderr
    return HELP_OUTPUT[command]


@pytest.fixture(scope="module")
def help_cwd(tmp_path_factory) -> Path:
    return clone_layout(tmp_path_factory.mktemp("readme-help"))


@pytest.mark.parametrize("command", ids(COMMANDS, ("help", "heavy")))
def test_help_or_dry_run_knows_every_option(command, help_cwd):
    """The GPU/ImageNet/cluster commands and the heavy ones: their programs' help lists every option."""
    check, argv = COMMANDS[command], shlex.split(command)
    launcher, program = split_launcher(argv)
    missing = []
    if launcher:
        text = help_text(f"{launcher[0]} --help", help_cwd)
        missing += [f"{launcher[0]}: {o}" for o in options(launcher) if not listed(o, text)]
    text = "\n".join(help_text(h, help_cwd) for h in check.help)
    missing += [f"{' | '.join(check.help)}: {o}" for o in options(program) if not listed(o, text)]
    assert not missing, f"README command {command!r} gives options its program does not list:\n" + "\n".join(missing)
    # The repository files it names (npp/train.py, ds_configs/zero2.json, notebooks/*.ipynb, app/demo.py).
    tracked = {p.name for p in help_cwd.iterdir() if p.is_dir()} - {".venv"}
    named = [t for t in argv if "/" in t and t.split("/")[0] in tracked and t.split("/")[0] != "runs"]
    assert all((ROOT / t).exists() for t in named), [t for t in named if not (ROOT / t).exists()]


@pytest.mark.parametrize("command", ids(COMMANDS, ("heavy",)))
def test_heavy_command_exits_0_as_written(command, heavy_cwd, request):
    if command == "make quickstart":
        done = request.getfixturevalue("quickstarted")
    else:
        if COMMANDS[command].after_quickstart:
            first = request.getfixturevalue("quickstarted")
            assert first.returncode == 0, failure("make quickstart", heavy_cwd, first)
        done = bash(command, heavy_cwd, timeout=6000, threads=None)
    assert done.returncode == 0, failure(command, heavy_cwd, done)


# ---- the README's results ------------------------------------------------------------------------

def test_every_results_block_is_its_folders_recorded_tables():
    """A results table in the README is the results.md of the folder the block names (benchmarks/reproduce.py's,
    or study.py's for docs/results/study), unedited, and that folder's results.json holds what it was drawn from."""
    import json

    blocks = [block for page in (README, RESULTS_PAGE)
              for block in re.findall(r"<!-- results:([\w.-]+):begin -->\n(.*?)\n<!-- results:\1:end -->",
                                      page.read_text(), re.S)]
    assert {"summary", "draws", "study", "mnist-8x8"} <= {name for name, _ in blocks}
    for folder, table in blocks:
        if folder in GENERATED:
            assert table == (ROOT / GENERATED[folder]).read_text().rstrip("\n"), f"block {folder} was edited"
            continue
        recorded = ROOT / "docs" / "results" / folder
        assert table == (recorded / "results.md").read_text().rstrip("\n"), f"results block {folder} was edited"
        data = json.loads((recorded / "results.json").read_text())
        if folder == "study":  # benchmarks/study.py's: the sets' own numbers and the readings drawn from them
            assert data["sets"] and data["ladder"]["rungs"] and data["cost"]
            assert all(s["missing"] or s["rows"] for s in data["sets"])
            continue
        assert data["runs"] and data["rows"] and "comparisons" in data
        for comparison in data["comparisons"]:
            assert len(comparison["fid"]["diffs"]) == comparison["seeds"]
