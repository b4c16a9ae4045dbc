"""docs/recipes.md, the reference of every recipe key, is generated from the config dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctxdiff.recipe_docs import field_comments, render_recipe_reference
from ctxdiff.training.recipe import Recipe
from ctxdiff.training.tune_video import TuneConfig

DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def reference() -> str:
    return render_recipe_reference()


def _rows(reference: str) -> dict[str, str]:
    """Table rows by their key (the first cell, without backticks)."""
    return {line.split(" | ")[0].removeprefix("| ").strip("`"): line
            for line in reference.splitlines() if line.startswith("| `")}


def _keys(cls: type, path: str = "") -> list[str]:
    """Every dotted key of `cls`, sections (also `X | None` ones) included, walked independently."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        keys.append(key)
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            keys += _keys(options[0], key)
    return keys


def test_committed_reference_is_the_generated_one(reference):
    committed = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    assert committed == reference, (
        "docs/recipes.md is out of date with the recipe dataclasses; "
        "run `python -m ctxdiff.recipe_docs > docs/recipes.md` and commit it")


@pytest.mark.parametrize("root", [Recipe, TuneConfig], ids=lambda c: c.__name__)
def test_every_recipe_key_has_a_row(reference, root):
    rows = _rows(reference)
    missing = [key for key in _keys(root) if key not in rows]
    assert not missing, f"keys without a row in the recipe reference: {missing}"


def test_a_fields_trailing_comment_is_its_meaning(reference):
    assert _rows(reference)["train.ema_decay"].endswith("| 0: no EMA |")


@dataclass(frozen=True)
class _Commented:
    """A section whose comments the extraction could get wrong."""

    tag: str = "a # not a comment"  # the real one
    # a comment before a field belongs to no field
    wrapped: int = 0  # first line,
                      # second line
    bare: bool = False

    def method(self) -> None:
        x: int = 1  # a local, not a field
        del x


def test_comments_join_continuations_and_ignore_hashes_in_strings():
    assert field_comments(_Commented) == {"tag": "the real one", "wrapped": "first line, second line", "bare": ""}
