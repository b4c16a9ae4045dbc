"""The package's layout is part of its design: small files, layers that import downwards only, no
import circles (function-level imports count too), and no lab code inside the product."""

import ast
from pathlib import Path

import ctxdiff

PACKAGE = Path(ctxdiff.__file__).parent
# A module may import from its own layer and the layers before it, never from a later one.
LAYERS = [("errors", "safe_pickle", "checkpoints", "recipes", "distributed"), ("diffusion", "data", "shapes"), ("models",), ("formats",), ("metrics",),
          ("pipelines",), ("training", "evaluation", "recipe_docs"), ("cli",)]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctxdiff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ctxdiff")}
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if top in names), -1)


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] for m in modules() if "." in m} - {"__main__", "assets"}
    assert tops <= {name for names in LAYERS for name in names}


def test_no_package_file_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_layers_import_downwards_only():
    wrong = [f"{m} imports {i}" for m, p in modules().items() for i in imports(p)
             if layer(i) > layer(m) >= 0 and not _type_only(p, i)]
    assert not wrong


def test_there_is_no_import_circle():
    graph = {m: {i for i in imports(p) if i in modules() and i != m and not _type_only(p, i)}
             for m, p in modules().items()}
    done, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for n in graph[m]:
            if not _is_package_of(n, m):
                visit(n)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert not circles


def _is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _type_only(path: Path, module: str) -> bool:
    """Imports under `if TYPE_CHECKING:` name types for annotations; they never run."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            if any(isinstance(n, ast.ImportFrom) and n.module == module for n in ast.walk(node)):
                return True
    return False
