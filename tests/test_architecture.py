"""The package's modules import as docs/architecture.md's layer table says: each module only
modules of its own layer or the layers above."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_imports import _module_graph

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _layers() -> dict[str, int]:
    """Module or package name (dotted, without `policyplug.`) -> its layer number, from the doc."""
    layers: dict[str, int] = {}
    for number, names in re.findall(r"^\| (\d)\. (.*?) \|", DOC.read_text(), re.M):
        for name in re.findall(r"`([^`]+)`", names):
            layers[name.replace("/", ".")] = int(number)
    return layers


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    name = module.removeprefix("policyplug").removeprefix(".")
    if name in ("", "__init__"):
        return layers.get("__init__")
    while name:
        if name in layers:
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def test_every_module_has_a_layer_in_the_doc() -> None:
    layers = _layers()
    assert len(set(layers.values())) == 7, layers
    missing = [m for m in _module_graph() if _layer_of(m, layers) is None]
    assert missing == [], f"modules docs/architecture.md does not place: {missing}"


def test_no_module_imports_a_later_layer() -> None:
    layers = _layers()
    graph = _module_graph()
    backwards = [
        f"{m} (layer {_layer_of(m, layers)}) imports {d} (layer {_layer_of(d, layers)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if (_layer_of(d, layers) or 0) > (_layer_of(m, layers) or 0)
    ]
    assert backwards == [], "\n".join(backwards)
