"""docs/api.md is a tested page: its `python` code blocks run in order, in one namespace, in a
temporary folder; blocks marked `python no-run` need a user's files and are only compiled."""

import re
from pathlib import Path

import pytest

from ctxdiff.formats.t2i import DEFAULT_MODEL

PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
BLOCK = re.compile(r"^```python( no-run)?\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[bool, str]]:
    return [(bool(skip), code) for skip, code in BLOCK.findall(PAGE.read_text())]


def test_the_page_has_runnable_examples():
    assert sum(not skip for skip, _ in blocks()) >= 4


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_every_example_on_the_api_page_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, (skip, code) in enumerate(blocks()):
        compiled = compile(code, f"docs/api.md block {i}", "exec")
        if not skip:
            exec(compiled, namespace)
    assert (tmp_path / "circle.png").is_file()
    assert namespace["edited"].frames.shape == namespace["source"].frames.shape
