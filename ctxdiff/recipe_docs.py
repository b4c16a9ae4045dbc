"""The reference of every recipe key (docs/recipes.md), generated from the config dataclasses.

`python -m ctxdiff.recipe_docs > docs/recipes.md` rewrites it; tests/test_docs_recipes.py checks that
the committed file matches, so the reference cannot drift from the schema. A key's meaning is the
trailing `# comment` on its field's line in the class source (comment-only lines below it, indented
past the field, continue it); a section's text is the first paragraph of its class docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import yaml

from ctxdiff.recipes import to_dict

INTRO = """\
# Recipe reference

Generated from the config dataclasses (`python -m ctxdiff.recipe_docs > docs/recipes.md`); do not edit.

A `ctxdiff train` recipe is a YAML mapping: the top-level keys below, and one nested mapping per
section (`model:`, `model.unet:`, `train:`, ...). Every key is optional unless its default reads
*required*; a key left out takes its default, and a section left empty takes all of its defaults
(one whose type allows null is then null). An unknown key or a value of the wrong type is an error
that names the dotted key (`train.stpes: unknown recipe key; did you mean train.steps?`). A list
type takes a YAML list; a float key also takes an integer, and `1e-4` reads as a float.

`base: other.yaml` (a path relative to the recipe file) starts from another recipe: the two are merged
mapping by mapping, and where both set a key this file wins; a base may have a base of its own.
`--set a.b=value` (repeatable) then sets one dotted key, its value read as YAML (`null`, `[1, 2]`,
`1e-4`). `ctxdiff train --recipe R.yaml --print-recipe` prints the resolved recipe, every key filled
in, and exits; that YAML loads back unchanged.

A `ctxdiff tune-video --recipe R.yaml` recipe (recipes/video-tune.yaml) is a flat mapping of the
`TuneConfig` keys at the end; it follows `base:` too, then `--set key=value`, then the command's
flags (`--steps`, `--lr`, ...).
"""


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each annotated field in `cls`'s body, continuation lines joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[str, list[str]] = {}
    line: list[tokenize.TokenInfo] = []  # the tokens of the statement read so far
    current: str | None = None  # the field whose comments are being read
    depth = field_col = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            if current is not None and (line or tok.start[1] > field_col):  # its line, or continues it
                comments[current].append(tok.string)
            else:
                current = None  # a comment at the fields' indentation belongs to what follows
        elif tok.type == tokenize.NEWLINE:
            line = []
        elif tok.type not in (tokenize.NL, tokenize.ENDMARKER):
            if not line:
                current = None
                if depth == 1 and tok.type == tokenize.NAME:
                    field_col = tok.start[1]
            line.append(tok)
            if depth == 1 and len(line) == 2 and line[0].type == tokenize.NAME and tok.string == ":":
                current = line[0].string
                comments[current] = []
    return {name: " ".join(c.lstrip("#").strip() for c in parts) for name, parts in comments.items()}


def first_paragraph(cls: type) -> str:
    """The first paragraph of the docstring written in `cls`'s source (not one dataclass made up)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    doc = ast.get_docstring(node) if isinstance(node, ast.ClassDef) else None
    return " ".join((doc or "").split("\n\n")[0].split())


def walk_sections(cls: type, path: str = "") -> Iterator[tuple[str, type]]:
    """(dotted path, dataclass) of `cls` and of every section below it, depth first in field order."""
    yield path, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and (section := _section_class(hints[f.name])) is not None:
            yield from walk_sections(section, _join(path, f.name))


def render_recipe_reference() -> str:
    """docs/recipes.md: the intro, then one table of keys per section of `Recipe` and `TuneConfig`."""
    from ctxdiff.training.recipe import Recipe
    from ctxdiff.training.tune_video import TuneConfig

    roots = [(Recipe, "top level of a `ctxdiff train` recipe"),
             (TuneConfig, "top level of a `ctxdiff tune-video` recipe")]
    sections = [_render_section(path, cls, where) for root, where in roots for path, cls in walk_sections(root)]
    return "\n".join([INTRO, *sections])


def main() -> None:
    """Print the reference (`python -m ctxdiff.recipe_docs > docs/recipes.md`)."""
    print(render_recipe_reference(), end="")


# --------------------------------------------------------------------------- rendering


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def _section_class(tp: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), or None for a plain value."""
    if _is_union(tp):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _section_class(options[0]) if len(options) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _heading(path: str, cls: type, where: str) -> str:
    return f"`{path}` ({cls.__name__})" if path else f"{cls.__name__} ({where})"


def _anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _type_name(tp: Any, path: str) -> str:
    """The type of a key as a user reads it; `path` is the key's (for a section, its link)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return f"section [`{path}`](#{_anchor(_heading(path, tp, ''))})"
    if _is_union(tp):
        named = [_type_name(a, path) for a in args if a is not type(None)]
        return " or ".join(named) + (", null allowed" if type(None) in args else "")
    if origin is Literal:
        return "one of " + " | ".join(f'"{a}"' if isinstance(a, str) else _yaml(a) for a in args)
    if origin in (tuple, list):
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {_type_name(args[0], path)}" if args else "list"
        if len(set(args)) == 1:
            return f"list of {len(args)} {_type_name(args[0], path)}"
        return "list [" + ", ".join(_type_name(a, path) for a in args) + "]"
    if origin is dict or tp is dict:
        return "mapping"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "*required*"
    return "its keys' defaults" if dataclasses.is_dataclass(value) else f"`{_yaml(to_dict(value))}`"


def _escape(text: str) -> str:
    """`text` safe in a Markdown table cell: `|` would end it, `<output>` outside `code` reads as HTML."""
    parts = text.replace("|", r"\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _render_section(path: str, cls: type, where: str) -> str:
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    lines = [f"## {_heading(path, cls, where)}", ""]
    if doc := first_paragraph(cls):
        lines += [_escape(doc), ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.init:
            key = _join(path, f.name)
            row = (f"`{key}`", _type_name(hints[f.name], key), _default(f), comments.get(f.name, ""))
            lines.append("| " + " | ".join(_escape(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
