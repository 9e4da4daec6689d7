"""The import graph goes one way (DESIGN.md, "Layers"): the mixing operator and the methods load no data or run code
(torchvision, which the backbones need, brings PIL along: that is a library, not our data layer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixmask import config, masks, operator, vocab
from mixmask.methods import BRANCH_KINDS


@pytest.mark.parametrize("module", ["mixmask.operator", "mixmask.methods", "mixmask.losses"])
def test_the_method_core_imports_no_data_or_run_code(repo_root, module):
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pipelines', 'ffcv', 'nvidia', 'webdataset') "
            "or m in ('mixmask.config', 'mixmask.presets', 'mixmask.training')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"


def test_one_vocabulary_everywhere():
    assert config.BRANCHES is vocab.BRANCHES and config.MASK_KINDS is vocab.MASK_KINDS
    assert set(vocab.BRANCH_KINDS) == set(vocab.BRANCHES) and BRANCH_KINDS is vocab.BRANCH_KINDS
    assert tuple(masks.MASK_GENERATORS) == vocab.MASK_KINDS == operator.MASK_KINDS
    assert {k for kinds in vocab.BRANCH_KINDS.values() for k in kinds} == set(vocab.MIXED_KINDS)
    fills = next(f for f in config.MaskConfig.__dataclass_fields__.values() if f.name == "erase_fill")
    assert fills.metadata["choices"] == vocab.ERASE_FILLS
