"""No host synchronisation on the hot path: the mixing operator (every branch) and the batched photometric ops.

On CUDA (`gpu`): each step runs under `torch.cuda.set_sync_debug_mode("error")`, which raises at any blocking
host-device copy or synchronisation. On the CPU a guard catches the two ways such syncs crept in: a tensor built
from Python data inside a step (`torch.tensor([...], device=cuda)` is a blocking copy) and a per-step copy of a
tensor that the object holds across steps (a CPU constant moved to the device at every call).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mixmask.run.build import build_operator
from mixmask.run.config import BRANCHES
from mixmask.run.config_cli import resolve
from pipelines.augment import RECIPES, recipe
from pipelines.photometric import Photometric

RESOLUTION = 96  # above the small-image limit, so the recipes keep their Gaussian blur
_FROM_PYTHON = (torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor)
_COPIES = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.type)


class StepGuard(TorchFunctionMode):
    """Records tensors made from Python data, and copies of the `held` tensors, made while the mode is active."""

    def __init__(self, held: list[torch.Tensor]) -> None:
        super().__init__()
        self.held = {id(t) for t in held}
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if func in _FROM_PYTHON:
            self.found.append(f"{name} from Python data")
        elif func in _COPIES and args and id(args[0]) in self.held and out is not args[0]:
            self.found.append(f"per-step {name} of a held tensor")
        return out


def _operator(branch: str):
    # The real config-to-operator path: erase gets the (C,) black-pixel fill that build_operator makes on the CPU.
    return build_operator(resolve("demo", None, [f"method.branch={branch}", "mask.grid_size=4"]))


def _held(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return list(obj.buffers())
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


def _photometric_modules(device: torch.device, dtype: torch.dtype):
    for name in RECIPES:
        for i, spec in enumerate(recipe(name, RESOLUTION)):
            # fused_cpu=False: the torch ops, which are the CUDA path.
            yield f"{name}[{i}]", Photometric(spec, device=device, seed=i, dtype=dtype, fused_cpu=False)


def test_guard_sees_what_it_guards_against():
    held = torch.zeros(3)
    with StepGuard([held]) as guard:
        torch.tensor([5.0, 3.0, 1.0])
        held.to(torch.bfloat16)
        held.to(torch.float32)  # a no-op returns the same tensor: not a copy
    assert guard.found == ["tensor from Python data", "per-step to of a held tensor"]


@pytest.mark.parametrize("branch", BRANCHES)
def test_operator_steps_build_nothing_from_python_data(branch):
    operator = _operator(branch)
    gen = torch.Generator().manual_seed(0)
    view1 = torch.randn(8, 3, 32, 32).to(torch.bfloat16)  # bf16 as the GPU loaders give: a held fp32 fill would cast
    operator(view1, gen)  # the first step may place constants once
    with StepGuard(_held(operator)) as guard:
        for _ in range(2):
            operator(view1, gen)
    assert guard.found == [], branch


def test_photometric_steps_build_nothing_from_python_data():
    images = torch.randint(0, 256, (16, RESOLUTION, RESOLUTION, 3), dtype=torch.uint8)
    for name, module in _photometric_modules(torch.device("cpu"), torch.bfloat16):
        module(images)
        with StepGuard(_held(module)) as guard:
            module(images)
        assert guard.found == [], name


@pytest.mark.gpu
def test_operator_and_photometric_do_not_sync_on_cuda():
    device = torch.device("cuda")
    view1 = torch.randn(256, 3, 64, 64, device=device).to(torch.bfloat16)
    images = torch.randint(0, 256, (64, RESOLUTION, RESOLUTION, 3), dtype=torch.uint8, device=device)
    steps = [(f"operator {b}", _operator(b), torch.Generator(device=device).manual_seed(0)) for b in BRANCHES]
    photometric = list(_photometric_modules(device, torch.bfloat16))
    for _, operator, gen in steps:  # first step: compile the mask kernel, place constants once
        operator(view1, gen)
    for _, module in photometric:
        module(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, operator, gen in steps:
            for _ in range(2):
                out = operator(view1, gen)
            assert all(m.images.is_cuda and m.lam.is_cuda for m in out), name
        for name, module in photometric:
            assert module(images).is_cuda, name
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
