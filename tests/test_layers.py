"""The import graph goes one way (DESIGN.md, "Layers"): the mixing operator and the methods load no data or run code
(torchvision, which the backbones need, brings PIL along: that is a library, not our data layer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixmask import vocab
from mixmask.core import masks, operator
from mixmask.core.methods import BRANCH_KINDS
from mixmask.run import config


@pytest.mark.parametrize("module", ["mixmask.core.operator", "mixmask.core.methods", "mixmask.core.losses"])
def test_the_method_core_imports_no_data_or_run_code(repo_root, module):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pipelines', 'ffcv', 'nvidia', 'webdataset') "
            "or m in ('mixmask.run.config', 'mixmask.run.presets', 'mixmask.run.build')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"


def test_one_vocabulary_everywhere():
    assert config.BRANCHES is vocab.BRANCHES and config.MASK_KINDS is vocab.MASK_KINDS
    assert set(vocab.BRANCH_KINDS) == set(vocab.BRANCHES) and BRANCH_KINDS is vocab.BRANCH_KINDS
    assert tuple(masks.MASK_GENERATORS) == vocab.MASK_KINDS == operator.MASK_KINDS
    assert {k for kinds in vocab.BRANCH_KINDS.values() for k in kinds} == set(vocab.MIXED_KINDS)
    fills = next(f for f in config.MaskConfig.__dataclass_fields__.values() if f.name == "erase_fill")
    assert fills.metadata["choices"] == vocab.ERASE_FILLS


def _imported_modules(path):
    """Every module a source file imports (top level or inside functions), as dotted names."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


# Layer → the packages it must never import (DESIGN.md "Layers"; README "Architecture"). The base modules
# (mixmask.errors, mixmask.fields, mixmask.vocab, mixmask.batches) are shared by every layer.
_FORBIDDEN = {
    "pipelines": ("mixmask.core", "mixmask.run", "mixmask.evaluation", "mixmask.benchmarking", "mixmask.reproduce"),
    "mixmask/core": ("pipelines", "mixmask.run", "mixmask.evaluation", "mixmask.benchmarking", "mixmask.reproduce"),
    "mixmask/evaluation": ("pipelines", "mixmask.run", "mixmask.benchmarking", "mixmask.reproduce"),
}


@pytest.mark.parametrize("layer", sorted(_FORBIDDEN))
def test_imports_go_one_way(repo_root, layer):
    files = sorted((repo_root / layer).rglob("*.py"))
    assert files, layer
    breaks = [f"{f.relative_to(repo_root)} imports {name}" for f in files for name in sorted(_imported_modules(f))
              if any(name == bad or name.startswith(bad + ".") for bad in _FORBIDDEN[layer])]
    assert not breaks, breaks
