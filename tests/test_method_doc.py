"""Every method fact the code cites can be followed: citations name docs/method.md and a section it has.

Comments and docs cite the method as "docs/method.md §N" (the `## N.` headings of that file). A citation of a
section that does not exist, or of a document the repository does not ship (the authors' notes were once cited
by name), leaves a reader of the code with nowhere to go.
"""

from __future__ import annotations

import re
import subprocess

from test_faults import ROOT

METHOD = ROOT / "docs" / "method.md"
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".yml", ".yaml", ".json", ".sh", ".cfg", ".txt"}
UNSHIPPED = re.compile(r"\bREFERENCE\b")
"""The unshipped document's name, as a word: identifiers such as EMBEDDED_REFERENCES do not match."""
CITATION = re.compile(r"docs/method\.md §(\d+(?:[–-]\d+)?(?:, §\d+(?:[–-]\d+)?)*)")
SECTION = re.compile(r"^## (\d+)\. ", re.M)


def tracked_text_files() -> dict[str, str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {path: (ROOT / path).read_text(errors="replace") for path in listed.split("\n")
            if path and (ROOT / path).suffix in TEXT_SUFFIXES and (ROOT / path).is_file()}


def cited_sections(text: str) -> set[int]:
    """Section numbers of every citation, ranges (§2–3) expanded."""
    numbers = set()
    for group in CITATION.findall(text):
        for first, last in re.findall(r"(\d+)(?:[–-](\d+))?", group):
            numbers.update(range(int(first), int(last or first) + 1))
    return numbers


def test_no_file_cites_the_unshipped_reference_document():
    citing = sorted(path for path, text in tracked_text_files().items() if UNSHIPPED.search(text))
    assert citing == [], f"cite docs/method.md §N instead in: {citing}"


def test_every_cited_method_section_exists():
    sections = {int(n) for n in SECTION.findall(METHOD.read_text())}
    assert sections == set(range(1, len(sections) + 1)), "method.md's sections are numbered 1, 2, … in order"
    dangling = {path: sorted(cited_sections(text) - sections) for path, text in tracked_text_files().items()}
    assert {path: missing for path, missing in dangling.items() if missing} == {}


def test_citations_are_found_with_their_ranges_and_lists():
    # The parser is what the check above rests on: a list and a range must yield every number they name.
    assert cited_sections("see docs/method.md §3, §10 and docs/method.md §2–4.") == {2, 3, 4, 10}
