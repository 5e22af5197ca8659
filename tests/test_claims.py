"""Every number in the results prose is recorded data at its printed rounding, so a sentence cannot drift from
the runs it describes.

The results prose is the README's quickstart and one-screen results and the whole results page
(docs/results/README.md). Generated blocks (`<!-- results:NAME:begin -->` … end, checked against their files by
test_readme.py), code blocks and image lines are left out; every other number that carries a decimal point, a
sign or a percent sign must be found, at the precision it is printed with, among the numbers of the recorded
results (every results.json under docs/results, fractions also as percents, parameter counts also in millions)
or of the benchmark record (docs/benchmarks.md, where the quickstart's measured figures live). The few
constants of the method and the paper that are not measurements are listed in NOT_MEASURED with their source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NOT_MEASURED = {
    "0.625×": "the #L2 λ½ budget: 1/2 · 1/4 + 1/2 of NTP's sequence positions (npp.relative_cost)",
    "0.64": "1,200 steps × 32 images / 60,000 digits, in epochs",
    "0.1": "the paper's dropout (docs/recipes.md)",
    "20%": "the paper's decay fraction (docs/recipes.md)",
    "100M–1.4B": "the paper's abstract",
    "4.6×": "training FLOPs per image, 16×16 against 8×8 tokens (docs/benchmarks.md: 3.40 / 0.736 GFLOP)",
}
"""Numbers in the results prose that are not measurements, with where they come from."""

NUMBER = re.compile(r"(?<![\w.,×])([+−-]?)(\d[\d,]*(?:\.\d+)?)(%|×(?!\d)|M\b)?(?!×\d)")
"""A number with its sign and unit; a grid or patch size (8×8, 2×2) is a shape, not a claim."""


def results_prose() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("## Set-up and tests", 1)[0]
    return {"README.md (quickstart and results)": quickstart,
            "docs/results/README.md": (ROOT / "docs" / "results" / "README.md").read_text()}


def strip_generated(text: str) -> str:
    text = re.sub(r"<!-- results:([\w.-]+):begin -->.*?<!-- results:\1:end -->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)  # commands and file names quoted in prose
    text = re.sub(r"^!\[.*$", "", text, flags=re.M)
    return re.sub(r"\]\([^)]*\)", "]", text)  # link targets


def claims(text: str) -> list[str]:
    """The numbers a reader takes as results: those with a decimal point, a sign, a percent or a ×."""
    found = []
    for sign, digits, unit in NUMBER.findall(strip_generated(text)):
        if "." in digits or sign or unit in ("%", "×"):
            found.append(f"{sign}{digits}{unit or ''}")
    return found


def flatten(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in flatten(v)]
    if isinstance(value, list):
        return [x for v in value for x in flatten(v)]
    return []


@pytest.fixture(scope="module")
def recorded() -> list[float]:
    values = [x for path in sorted((ROOT / "docs" / "results").rglob("results.json"))
              for x in flatten(json.loads(path.read_text()))]
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    values += [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", benchmarks)]
    return values


def found_in(claim: str, recorded: list[float]) -> bool:
    """Whether a recorded value prints as the claim: same rounding, as a fraction or a percent, parameters in M."""
    body = claim.lstrip("+−-").rstrip("%×M").replace(",", "")
    negative = claim[0] in "−-"
    decimals = len(body.split(".")[1]) if "." in body else 0
    target = float(body) * (-1 if negative else 1)
    scales = [1.0]
    if claim.endswith("%"):
        scales.append(100.0)  # a fraction recorded, shown as a percent
    if claim.endswith("M"):
        scales = [1e-6]  # a parameter count
    for value in recorded:
        for scale in scales:
            shown = round(value * scale, decimals)
            if shown == target or (not claim[0] in "+−-" and shown == abs(target)):
                return True
    return False


def test_the_claim_finder_reads_signs_decimals_percents_and_skips_generated_blocks():
    text = ("NTP scored −42.9 and +10.7, 3 of 7, 74% of 1,000 at 0.21M, 4.6× cheaper.\n"
            "<!-- results:x:begin -->\n-99.9\n<!-- results:x:end -->\n```bash\nmake 12.5\n```\n`--lr 0.5`")
    assert claims(text) == ["−42.9", "+10.7", "74%", "0.21M", "4.6×"]
    recorded = [-42.91, 10.66, 0.7412, 209_856.0]
    assert found_in("−42.9", recorded) and found_in("+10.7", recorded) and found_in("74%", recorded)
    assert found_in("0.21M", recorded) and not found_in("−43.0", recorded) and not found_in("+42.9", recorded)


@pytest.mark.parametrize("page", list(results_prose()))
def test_every_number_in_the_results_prose_is_recorded(page, recorded):
    missing = [c for c in claims(results_prose()[page]) if c not in NOT_MEASURED and not found_in(c, recorded)]
    assert not missing, (f"{page}: numbers found in no results.json and not in docs/benchmarks.md (at their "
                         f"printed rounding): {missing}; generate the sentence from the data or correct it")
