"""docs/architecture.md stays true: its layer table is the package's import graph, and every
module or name it points a reader to exists."""

from __future__ import annotations

import ast
import importlib
import re

from conftest import REPO

from ddp_diffusion.config import Config, to_dict

PACKAGE = REPO / "ddp_diffusion"
PAGE = (REPO / "docs" / "architecture.md").read_text()


def layers() -> dict[str, int]:
    """Module -> layer, from the page's table rows `| N | `a`, `b` | ... |`."""
    found: dict[str, int] = {}
    for layer, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", PAGE, re.M):
        for name in re.findall(r"`(\w+)`", modules):
            assert name not in found, f"{name} is listed twice"
            found[name] = int(layer)
    return found


def package_imports(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in it (inside functions too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    deps: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ddp_diffusion":
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddp_diffusion."):
            deps.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            deps.update(a.name.split(".")[1] for a in node.names
                        if a.name.startswith("ddp_diffusion."))
    return deps


def test_every_module_is_in_the_layer_table_once() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert set(layers()) == modules


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    layer = layers()
    upward = [f"{m} (layer {layer[m]}) imports {d} (layer {layer[d]})"
              for m in layer for d in sorted(package_imports(m)) if layer[d] > layer[m]]
    assert not upward, "\n".join(upward)


def is_config_key(dotted: str) -> bool:
    """Whether `dotted` is a key of the config, like train.grad_accum."""
    node: object = to_dict(Config())
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_name_the_page_points_to_exists() -> None:
    modules = set(layers())
    refs = {r for r in re.findall(r"`([\w.]+)`", PAGE)
            if "." in r and r.split(".")[0] in modules and not r.endswith(".py")}
    assert len(refs) > 30  # the page points to code; the pattern found it
    missing = []
    for ref in sorted(refs):
        module, *attrs = ref.split(".")
        obj: object = importlib.import_module(f"ddp_diffusion.{module}")
        for attr in attrs:
            obj = getattr(obj, attr, None)
        if obj is None and not is_config_key(ref):
            missing.append(ref)
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
