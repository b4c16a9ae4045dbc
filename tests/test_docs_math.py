"""docs/math.md cannot drift from the code: every `docs/math.md#anchor` cited in the package (and the
tests) names a heading of the page, every `ctxdiff.x.y.name` written there in backticks imports, every
`tests/test_x.py::test_name` it cites exists, and its own #links resolve."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "math.md"
CITATION = re.compile(r"docs/math\.md(?:#([\w-]+))?")
DOTTED_NAME = re.compile(r"`(ctxdiff(?:\.[A-Za-z_]\w*)+)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
LOCAL_LINK = re.compile(r"\]\(#([\w-]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lowercase, drop punctuation except '-' (word characters and spaces stay),
    spaces to '-' (runs of hyphens are not collapsed)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_anchors(text: str, suffix_repeats: bool = True) -> list[str]:
    """The anchors of the page's ATX headings, outside fenced blocks, with GitHub's -1, -2 suffixes for
    repeats (`suffix_repeats=False`: the bare anchors)."""
    anchors, seen, fenced = [], {}, False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fenced:
            base = github_anchor(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            anchors.append(base if n == 0 or not suffix_repeats else f"{base}-{n}")
    return anchors


def citing_files() -> list[Path]:
    files = sorted((ROOT / "ctxdiff").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def citations() -> list[tuple[str, str]]:
    """(file:line, anchor or '') for every docs/math.md citation in the package's and the tests' Python files."""
    found = []
    for path in citing_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", match.group(1) or ""))
    return found


def resolve(dotted: str):
    """Import the longest importable module prefix of `dotted`, then getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:cut]).startswith(e.name):
                raise  # a module that exists failed to import one of its own dependencies
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_anchor_rule_matches_github():
    assert github_anchor("Eq. 1: the context-biased forward marginal") == "eq-1-the-context-biased-forward-marginal"
    assert github_anchor("Eq. 9 and Eq. 11: context-aware DDIM (Lemma 2)") == "eq-9-and-eq-11-context-aware-ddim-lemma-2"
    assert github_anchor("A / B") == "a--b"
    assert doc_anchors("# A\n```\n# not a heading\n```\n## A\n") == ["a", "a-1"]


def test_headings_are_unique():
    bare = doc_anchors(doc_text(), suffix_repeats=False)
    assert bare, "docs/math.md has no headings"
    repeated = sorted({a for a in bare if bare.count(a) > 1})
    assert not repeated, f"repeated headings (GitHub suffixes them -1, -2): {repeated}"


def test_every_cited_anchor_is_a_heading():
    anchors = set(doc_anchors(doc_text()))
    missing = [f"{where}: docs/math.md#{anchor}" for where, anchor in citations() if anchor and anchor not in anchors]
    assert not missing, "citations of missing sections:\n" + "\n".join(missing)


def test_the_page_links_only_to_its_own_headings():
    text = doc_text()
    anchors = set(doc_anchors(text))
    missing = sorted(set(LOCAL_LINK.findall(text)) - anchors)
    assert not missing, f"docs/math.md links to missing sections: {missing}"


def test_every_named_function_resolves():
    names = sorted(set(DOTTED_NAME.findall(doc_text())))
    assert len(names) >= 20, names  # the page names the code for every equation
    failed = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            failed.append(f"{name}: {type(e).__name__}: {e}")
    assert not failed, "docs/math.md names code that does not exist:\n" + "\n".join(failed)


def test_every_named_test_exists():
    refs = sorted(set(TEST_REF.findall(doc_text())))
    assert refs, "docs/math.md names no tests"
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, "docs/math.md names tests that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("anchor", ["notation-and-indexing", "ddim-inversion", "classifier-free-guidance-on-x0"])
def test_the_sections_the_docstrings_cite_exist(anchor):
    assert anchor in doc_anchors(doc_text())
