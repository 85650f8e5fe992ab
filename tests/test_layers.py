"""The package's layers: every import (lazy ones inside functions included) goes down the declared order, never up,
and no two modules import each other, directly or through others. docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "smallvit"

# Bottom to top. A module may import modules of its own layer or of the layers below; cycles are refused anyway.
LAYERS: list[set[str]] = [
    # leaf helpers, dataset records, CIFAR-10-C's corruptions: import nothing of smallvit's
    {"warp", "cpu_kernels", "datasets", "budget", "corruptions"},
    {"config"},  # the machinery: dataclasses, parsing, checks
    {"experiments"},  # presets, ablations, studies, speed-run ingredients, paper numbers
    {"runs", "data", "imagesets", "model", "backbones", "whiten", "optim", "autoaugment", "wandb_log", "distributed"},
    {"augment", "multicrop", "pretrained"},
    {"evaluate", "knn", "lifecycle", "calibration", "robustness"},
    {"train"},
    {"pretrain", "profile", "predict", "export", "inspect_attn"},
    {"launchers", "slurm", "ablate", "report", "search", "search_report"},
    {"cli", "__init__", "__main__"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def imports(path: Path) -> set[str]:
    """The smallvit modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("smallvit."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("smallvit."))
    return out - {"__version__"}


GRAPH = {p.stem: imports(p) for p in sorted(SRC.glob("*.py"))}


def test_every_module_has_a_layer():
    assert not set(GRAPH) - set(RANK), f"add {sorted(set(GRAPH) - set(RANK))} to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    up = sorted(d for d in GRAPH[module] if d in RANK and RANK[d] > RANK.get(module, -1))
    assert not up, f"{module} (layer {RANK.get(module)}) imports {up} from a higher layer"


def test_no_import_cycles():
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in GRAPH.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in GRAPH if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"
