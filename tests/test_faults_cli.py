"""Issue 21, through the real command line: a bad `--config`, run name or runs folder, a damaged file of a run
(config.json, a checkpoint's meta.json, the `latest` pointer) and the quickstart's own options each end in one line
on stderr with exit code 2 before any training, and nothing is written; the same data folder spelled otherwise
resumes, another folder is still refused.

One run is trained per module, on the test codes copied to WORK/codes/x and named from WORK as `codes/x`.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import npp
from npp.checkpoints import Checkpointer, export_run, load_checkpoint_model
from npp.config import RUN_NAME_MAX, TrainConfig, run_name_problem, same_data
from npp.errors import USER_ERRORS, ConfigError
from npp.extract import mnist_codes
from npp.recipes import resolve
from npp.runs import RunDir
from test_faults import NPP, codes, env, one_line, train_argv  # noqa: F401  (codes is a fixture)


def npp_cli(work: Path, *argv: str) -> subprocess.CompletedProcess:
    """`npp ARGV` run from the folder `work` (where the data is `codes/x`)."""
    return subprocess.run([NPP, *argv], cwd=work, env=env(work), capture_output=True, text=True, timeout=600)


def train(work: Path, name: str, *extra: str, data: str = "codes/x") -> subprocess.CompletedProcess:
    return npp_cli(work, "train", *train_argv(data, work / "runs", name), *extra)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(codes, tmp_path_factory) -> Path:
    """WORK/codes/x (the test codes) and WORK/runs/d, trained 20 steps on them (checkpoints at 10, 14, 20)."""
    work = tmp_path_factory.mktemp("cli")
    shutil.copytree(codes, work / "codes" / "x")
    result = train(work, "d")
    assert result.returncode == 0, result.stderr[-3000:]
    assert RunDir(work / "runs" / "d").checkpoint_tags() == ["step-00000010", "step-00000014", "step-00000020"]
    return work


def copy_run(work: Path, name: str) -> RunDir:
    target = work / "runs" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(work / "runs" / "d", target)
    return RunDir(target)


# ---- --config files and run names --------------------------------------------------------------

# The heavy ones add a case each to what the default ones check; every `npp` start costs ~2 s of CPU (torch).
@pytest.mark.parametrize("content,message", [
    pytest.param(b'{"name": "caf\xe9"}', "is not UTF-8 text (at byte offset 13): save it as UTF-8 JSON", id="not-utf8"),
    pytest.param(b'{"schedule": 5}', "'schedule' is a JSON int (5), not an object of ScheduleConfig fields",
                 id="schedule-5"),
    pytest.param(b'{"eval_sampler": [2.0]}', "'eval_sampler' is a JSON list ([2.0]), not an object of SamplerConfig "
                 "fields", id="sampler-list", marks=pytest.mark.heavy),
    pytest.param(b'{"name": "a\\u0000b"}', "TrainConfig.name='a\\x00b': contains a NUL byte", id="nul-in-name"),
    pytest.param(b'{"eval_reference": "r\\u0000s"}', "TrainConfig.eval_reference contains a NUL byte",
                 id="nul-in-a-path", marks=pytest.mark.heavy),
])
def test_a_bad_config_file_is_one_line_before_anything_is_written(work, tmp_path, content, message):
    (tmp_path / "run.json").write_bytes(content)
    # No schedule flag: the file's section alone reaches the recipe's merge (a traceback before this issue).
    result = npp_cli(work, "train", "--config", str(tmp_path / "run.json"), "--runs-dir", str(tmp_path / "runs"),
                     "--data", "codes/x", "--model", "debug", "--no-progress")
    assert message in one_line(result, "npp train")
    assert result.stdout == "" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,message", [
    pytest.param("x" * 300, f"has 300 characters, more than {RUN_NAME_MAX}", id="300-characters"),
    pytest.param("a/b", "is not a single folder name", id="slash", marks=pytest.mark.heavy),
    pytest.param("..", "is not a single folder name", id="dot-dot", marks=pytest.mark.heavy),
    pytest.param("two\nlines", "contains a control character", id="newline", marks=pytest.mark.heavy),
])
def test_a_run_name_that_is_not_one_sane_folder_name_is_one_line(work, tmp_path, name, message):
    result = npp_cli(work, "train", *train_argv("codes/x", tmp_path / "runs", name))
    error = one_line(result, "npp train")
    assert message in error and "give a plain folder name such as 'ntp-tiny'" in error
    assert not (tmp_path / "runs").exists()


def test_a_config_section_that_is_not_an_object_is_refused_by_the_merge_too():
    # The notebooks and the quickstart build configs with resolve(), without a --config file.
    for section in ("schedule", "eval_sampler"):
        with pytest.raises(ConfigError, match=f"TrainConfig.{section}=5: give an object"):
            resolve({"data": "mnist-8x8", "model": "debug", section: 5}, "quickstart")


def test_run_name_rules():
    assert run_name_problem("npp-tiny_s1.v2") is None and run_name_problem("x" * RUN_NAME_MAX) is None
    assert [run_name_problem(n) is not None for n in ("", ".", "..", "a/b", "a\\b", "a\0b", "x" * 101)] == [True] * 7


# ---- the runs folder and the run folder -----------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("runs-dir", "runs is a file, not a folder: give a folder as --runs-dir"),
    ("run", "runs/r is a file, not a folder: move the file away, or give another --name"),
    pytest.param("under-a-file", "runs is a file, not a folder, so", marks=pytest.mark.heavy),
], ids=["runs-dir", "run", "under-a-file"])
def test_a_file_where_a_folder_belongs_is_one_line(work, tmp_path, case, message):
    runs = tmp_path / "runs"
    if case == "run":
        runs.mkdir()
        (runs / "r").write_text("notes\n")
    else:
        runs.write_text("notes\n")
    before = tree(tmp_path)
    given = runs / "deeper" if case == "under-a-file" else runs
    error = one_line(npp_cli(work, "train", *train_argv("codes/x", given, "r")), "npp train")
    assert message in error
    assert tree(tmp_path) == before


@contextlib.contextmanager
def read_only_folder(path: Path):
    """An empty folder that nobody, root included, can write into: as root a read-only tmpfs mounted on it
    (or, where mounting is not allowed, the immutable attribute); as another user, permissions 0o555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode == 0:
        undo = ["umount", str(path)]
    else:
        assert subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0, \
            "root here can neither mount a read-only tmpfs nor set the immutable attribute"
        undo = ["chattr", "-i", str(path)]
    try:
        yield path
    finally:
        subprocess.run(undo, check=True)


def test_a_read_only_runs_folder_is_one_line_before_training(work, tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        assert not os.access(ro, os.W_OK)  # the folder really is read-only here
        for runs in (ro / "runs",):
            result = npp_cli(work, "train", *train_argv("codes/x", runs, "r"))
            error = one_line(result, "npp train")
            assert f"{ro} cannot be written to (a read-only file system, or no permission)" in error
            assert "training" not in result.stdout and "step" not in result.stdout
        assert list(ro.iterdir()) == []


# ---- damaged files of a run: train (resume), export and the notebooks' loaders ------------------------

DAMAGE = {
    "config-not-utf8": ("config.json", b'{"name": "d\xff"}', "config.json is damaged ('utf-8' codec"),
    "config-not-an-object": ("config.json", b"[1, 2]", "config.json is damaged (a JSON list, not an object"),
    "meta-empty": ("checkpoints/step-00000020/meta.json", b"{}",
                   "meta.json is damaged (missing or malformed: step, world_size, zero_stage, model, tokenizer"),
    "latest-binary": ("checkpoints/latest", b"\x00\xff\xfe\x80", "checkpoints/latest is damaged (not text): write "
                      "the tag of a complete checkpoint into it (echo step-00000020 > "),
    "latest-a-path": ("checkpoints/latest", b"../../elsewhere\n", "checkpoints/latest is damaged (it holds "
                      "'../../elsewhere', not a checkpoint tag)"),
}


def damage(work: Path, kind: str) -> tuple[RunDir, str]:
    run = copy_run(work, kind)
    relative, content, message = DAMAGE[kind]
    (run.path / relative).write_bytes(content)
    return run, message


@pytest.mark.parametrize("kind", [k if k in ("config-not-utf8", "latest-binary") else
                                  pytest.param(k, marks=pytest.mark.heavy) for k in DAMAGE if k != "meta-empty"])
def test_resuming_a_damaged_run_is_one_line_and_keeps_it(work, kind):
    run, message = damage(work, kind)
    before = tree(run.path)
    result = train(work, kind)
    assert message in one_line(result, "npp train")
    assert tree(run.path) == before


def test_resuming_past_a_checkpoint_with_an_empty_meta_json_uses_the_one_before(work):
    run, message = damage(work, "meta-empty")
    result = train(work, "meta-empty")
    assert result.returncode == 0, result.stderr[-3000:]
    assert message in result.stderr and "trying the one before it" in result.stderr
    assert "resuming at step 14" in result.stdout
    meta = run.checkpoint_meta("step-00000020")  # written again, whole
    assert meta["step"] == 20 and meta["experiment"] == run.checkpoint_meta("step-00000014")["experiment"]


@pytest.mark.parametrize("kind", [k if k in ("config-not-utf8", "latest-binary") else
                                  pytest.param(k, marks=pytest.mark.heavy) for k in DAMAGE if k != "meta-empty"])
def test_exporting_a_damaged_run_is_one_line_and_keeps_the_old_export(work, kind):
    run, message = damage(work, kind)
    before = tree(run.path)
    assert message in one_line(npp_cli(work, "export", str(run.path)), "npp export")
    assert tree(run.path) == before


def test_exporting_past_a_checkpoint_with_an_empty_meta_json_uses_the_one_before(work):
    run, message = damage(work, "meta-empty")
    result = npp_cli(work, "export", str(run.path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert message in result.stderr and "trying the one before it" in result.stderr
    assert RunDir(run.path).exported and '"checkpoint": "step-00000014"' in (run.export / "source.json").read_text()


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_the_notebooks_loaders_name_the_damaged_file(work, kind):
    run, message = damage(work, kind)
    # The patches and attention notebooks read the stages from config.json and load a checkpoint's model.
    # export_run skips a checkpoint whose meta.json is damaged for the one before it, as a resume does.
    loaders = {**({} if kind == "meta-empty" else {"export_run": lambda: export_run(run.path)}),
               **({"stage_checkpoints": run.stage_checkpoints} if kind.startswith("config") else
                  {"load_checkpoint_model": lambda: load_checkpoint_model(run.path)})}
    for name, load in loaders.items():
        with pytest.raises(USER_ERRORS) as caught:
            load()
        assert message in " ".join(str(caught.value).split()), name


# ---- the quickstart's own options --------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--per-class", "-1"], "--per-class -1: give a whole number ≥ 1"),
    (["--per-class", "x"], "argument --per-class: 'x' is not a whole number"),
    (["--eval-samples", "0"], "--eval-samples 0: EvalConfig.num_samples=0: use a positive whole number"),
    pytest.param(["--eval-samples", "3"], "--eval-samples 3: EvalConfig.num_samples=3: the metrics need at least 4 "
                 "samples", marks=pytest.mark.heavy),
    pytest.param(["--runs-dir", "a-file"], "a-file is a file, not a folder: give a folder as --runs-dir",
                 marks=pytest.mark.heavy),
], ids=["per-class-negative", "per-class-x", "eval-samples-0", "eval-samples-3", "runs-dir-a-file"])
def test_the_quickstart_checks_its_options_before_training(tmp_path, argv, message):
    (tmp_path / "a-file").write_text("notes\n")
    result = subprocess.run([sys.executable, "-m", "npp.quickstart", "--runs-dir", "runs", *argv], cwd=tmp_path,
                            env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert message in one_line(result, "npp quickstart")
    assert result.stdout == ""  # not even "1/3": nothing started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no runs, no cache


# ---- the same data, spelled otherwise (issue 21, point 6) -------------------------------------------

def resume_point(run: RunDir) -> None:
    """Make the run's latest checkpoint step 14, so that a resume trains and writes step 20 again."""
    shutil.rmtree(run.checkpoints / "step-00000020")
    Checkpointer(run, "test").set_latest("step-00000014")


def test_the_same_data_folder_spelled_otherwise_resumes(work):
    run = copy_run(work, "respelled")
    resume_point(run)
    experiment = run.checkpoint_meta("step-00000014")["experiment"]
    result = train(work, "respelled", data="./codes/x/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 14" in result.stdout and "other values" not in result.stderr
    # The checkpoint written now belongs to the run's experiment; config.json keeps the spelling it began with.
    assert run.checkpoint_meta("step-00000020")["experiment"] == experiment
    assert run.read_config()["data"] == "codes/x"
    assert [row["step"] for row in run.train_rows()] == list(range(1, 21))


def test_another_data_folder_is_still_refused(work, codes):
    run = copy_run(work, "other")
    # Other codes of the same shape: the first 128 digits, by the same tokenizer.
    other = mnist_codes(npp.VQModel.from_pretrained(Path(codes).parent / "vq"), work / "other", "train", limit=128)
    before = tree(run.path)
    error = one_line(train(work, "other", data=str(other.directory)), "npp train")
    assert "was started with other values of data" in error
    assert tree(run.path) == before


@pytest.mark.heavy  # two more resumes, ~30 s; the respelled path above runs by default
@pytest.mark.parametrize("spelling", ["link", "copy"])
def test_a_symlink_or_a_copy_of_the_data_folder_resumes(work, spelling):
    run = copy_run(work, f"data-{spelling}")
    resume_point(run)
    target = work / f"data-{spelling}"
    if not target.exists():
        if spelling == "link":
            target.symlink_to(work / "codes" / "x")
        else:
            shutil.copytree(work / "codes" / "x", target)
    result = train(work, f"data-{spelling}", data=target.name)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 14" in result.stdout


def test_same_data_compares_folders_not_spellings(work, tmp_path, monkeypatch):
    monkeypatch.chdir(work)
    (tmp_path / "link").symlink_to(work / "codes" / "x")
    assert same_data("codes/x", "./codes/x/") and same_data("codes/x", str(work / "codes" / "x"))
    assert same_data("codes/x", str(tmp_path / "link"))
    assert same_data("mnist-8x8", "mnist-8x8") and not same_data("mnist-8x8", "mnist-16x16")
    assert not same_data("codes/x", "mnist-8x8") and not same_data("codes/x", "codes/missing")
    assert same_data("gone/x", "gone/x")  # a folder no longer on this machine still equals itself


def test_saved_configs_still_equal_themselves():
    # The long study's runs name their data (mnist-8x8); a folder run whose folder is gone keeps its spelling.
    for data in ("mnist-8x8", "/nowhere/codes/x", "codes/x"):
        saved = TrainConfig(name="s", data=data, model="tiny").to_dict()
        assert TrainConfig.from_dict(saved).changes_from(saved) == []
        assert TrainConfig.from_dict(saved).experiment_id() == TrainConfig(name="s", data=data, model="tiny").experiment_id()
