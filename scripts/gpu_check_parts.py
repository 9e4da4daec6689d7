"""The parts of the GPU check that run inside one interpreter (the rest call bench.py and pytest).

`python scripts/gpu_check_parts.py PART --device cuda|cpu --size full|tiny --out ROWS.json`, one process per part,
started by scripts/gpu_check.py with its own time limit. Each part writes a JSON list of rows
(`name`, `status` pass | fail | skipped, `figures`, `detail`). Parts:

- env: Python, torch, CUDA, the GPU, the packages the check depends on, torch against the pinned version;
- peak: a large matrix product, the compute ceiling the step rows are compared to;
- kernel: the CUDA mask kernel against the CPU kernel on the same keys, and the time for 256 masks;
- sync: the operator, the device photometric ops and a full training step under
  `torch.cuda.set_sync_debug_mode("error")`;
- ddp: a one-rank process group (NCCL on CUDA, gloo on CPU) and one DistributedDataParallel step (under torchrun).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sizes per profile: `full` is the acceptance run on a GPU, `tiny` the CPU rehearsal that keeps the check alive.
SIZES = {
    "full": dict(arch="resnet50", cifar_stem=False, resolution=224, sync_batch=64, ddp_batch=32, kernel_masks=4096,
                 kernel_grids=(8, 14), peak_n=8192, repeats=10, queue_size=65536),
    "tiny": dict(arch="resnet18", cifar_stem=False, resolution=32, sync_batch=8, ddp_batch=8, kernel_masks=48,
                 kernel_grids=(8,), peak_n=256, repeats=3, queue_size=64),
}
PACKAGES = ("numpy", "numba", "numba-cuda", "omegaconf", "antlr4-python3-runtime", "ffcv", "nvidia-dali-cuda130",
            "torchvision", "PyYAML", "rich", "psutil", "pytest")


def row(name: str, status: str, detail: str = "", **figures) -> dict:
    return {"name": name, "status": status, "figures": figures, "detail": detail}


def version_tuple(text: str) -> tuple[int, ...]:
    """(2, 11, 0) from '2.11.0+cu130'."""
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def pinned_torch() -> str | None:
    """The torch version requirements.txt pins."""
    req = ROOT / "requirements.txt"
    match = re.search(r"^torch==([\w.]+)", req.read_text(), re.M) if req.is_file() else None
    return match.group(1) if match else None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a broken install that fails while importing: both mean "not usable"
        return False


def part_env(args) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    pinned = pinned_torch()
    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_pinned": pinned,
               "cuda": torch.version.cuda, "cuda_available": cuda,
               "gpu": torch.cuda.get_device_name() if cuda else None}
    figures.update({name: _dist_version(name) for name in PACKAGES})
    figures["ffcv_imports"] = importable("ffcv")
    figures["dali_imports"] = importable("nvidia.dali")
    notes = []
    if pinned and version_tuple(torch.__version__) < version_tuple(pinned):
        notes.append(f"torch {torch.__version__} is older than the pinned {pinned}: a failure below that names a "
                     "torch API may need the newer torch")
    missing = [m for m in ("omegaconf", "yaml", "rich", "numba") if not importable(m)]
    if missing:
        notes.append(f"cannot import {', '.join(missing)} (scripts/gpu_wheels.sh fills .gpu-wheels/ for the check)")
    if args.device == "cuda" and not cuda:
        return [row("environment", "fail", "GPU_CHECK_DEVICE=cuda but torch sees no CUDA device", **figures)]
    return [row("environment", "fail" if missing else "pass", "; ".join(notes), **figures)]


def part_peak(args) -> list[dict]:
    import torch

    from mixmask.benchmarking.protocol import measure

    device, n = torch.device(args.device), SIZES[args.size]["peak_n"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = measure("matmul", lambda: a @ b, items_per_call=1, warmup=3, repeats=SIZES[args.size]["repeats"],
                device=device)
    tflops = 2 * n**3 / m.median_s / 1e12
    return [row("matmul peak", "pass", f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} product, median of "
                f"{m.repeats}: the ceiling the step rows are compared to", tflops=tflops, ms=m.median_s * 1e3)]


def part_kernel(args) -> list[dict]:
    import numpy as np
    import torch

    from mixmask.benchmarking.protocol import measure
    from mixmask.core.mask_kernels import block_masks_cpu
    from mixmask.core.masks import block_masks

    sizes, device = SIZES[args.size], torch.device(args.device)
    rows = []
    n, differing, checked = sizes["kernel_masks"], 0, 0
    for grid in sizes["kernel_grids"]:
        rng = np.random.default_rng(grid)
        keys = rng.integers(0, 2**31, size=(n, 2), dtype=np.int64)
        targets = rng.integers(1, grid * grid // 2 + 1, size=n).astype(np.int32)
        expected = np.zeros((n, grid, grid), dtype=np.uint8)
        block_masks_cpu(keys, targets, expected)
        if device.type == "cuda":
            from mixmask.core.mask_kernels_cuda import launch_block_masks_torch

            out = torch.zeros((n, grid, grid), dtype=torch.uint8, device=device)
            launch_block_masks_torch(torch.from_numpy(keys).to(device), torch.from_numpy(targets).to(device), out)
            got = out.cpu().numpy()
        else:  # numba's CUDA simulator runs the same kernel source on the host (NUMBA_ENABLE_CUDASIM=1)
            from numba import config

            if not config.ENABLE_CUDASIM:
                raise RuntimeError("the cpu rehearsal of the kernel part needs NUMBA_ENABLE_CUDASIM=1")
            from mixmask.core.mask_kernels_cuda import launch_block_masks

            got = np.zeros_like(expected)
            launch_block_masks(keys, targets, got)
        differing += int((got != expected).reshape(n, -1).any(1).sum())
        checked += n
    where = "CUDA kernel on the device" if device.type == "cuda" else "CUDA kernel in numba's simulator"
    rows.append(row("mask kernel: CUDA = CPU", "pass" if differing == 0 else "fail",
                    f"{where} vs the CPU kernel, grids {list(sizes['kernel_grids'])}, same keys and targets",
                    masks=checked, differing=differing))
    gen = torch.Generator(device=device).manual_seed(0)
    m = measure("256 masks", lambda: block_masks(256, 8, 0.5, generator=gen, device=device), items_per_call=256,
                warmup=3, repeats=max(sizes["repeats"], 5), device=device, inner=10)
    rows.append(row("mask kernel: 256 masks", "pass", f"block_masks(256, grid 8, ratio 0.5) on {device.type}",
                    ms=m.median_s * 1e3, ms_min=m.min_s * 1e3, ms_max=m.max_s * 1e3))
    return rows


def _preset_parts(args, batch: int):
    """Method, operator and optimizer of the MoCo v2 + MixMask ImageNet preset, as train.py builds them."""
    import torch

    from mixmask.run.build import build_method_from_config, build_operator
    from mixmask.run.config import derived
    from mixmask.run.config_cli import resolve
    from mixmask.run.optim import build_optimizer

    s = SIZES[args.size]
    cfg = resolve("imagenet-moco-mixmask", overrides=[
        f"method.arch={s['arch']}", f"method.cifar_stem={str(s['cifar_stem']).lower()}",
        f"data.resolution={s['resolution']}", f"data.batch_size={batch}", f"method.moco.queue_size={s['queue_size']}",
        "data.source=synthetic", f"run.device={args.device}"])
    device = torch.device(args.device)
    method = build_method_from_config(cfg).to(device).to(memory_format=torch.channels_last)
    lr = derived(cfg, 1)["lr"]
    optimizer = build_optimizer(cfg.optim.name, method, lr=lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum)
    return cfg, method, build_operator(cfg), optimizer


def _views(batch: int, resolution: int, device, dtype, seed: int):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, 3, resolution, resolution)
    return [torch.randn(shape, generator=g, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2)]


def _where(err: BaseException) -> str:
    """file:line of the innermost frame of the project's code in the traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f.filename.startswith(str(ROOT)) and "/scripts/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).relative_to(ROOT)}:{f.lineno} ({(f.line or '').strip()[:80]})"


def part_sync(args) -> list[dict]:
    import torch

    from mixmask.run.step import TrainModel, train_step
    from pipelines.augment import recipe
    from pipelines.photometric import Photometric

    s, device = SIZES[args.size], torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if cuda else torch.float32  # run.precision=auto
    cfg, method, operator, optimizer = _preset_parts(args, s["sync_batch"])
    view1, view2 = _views(s["sync_batch"], s["resolution"], device, dtype, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    # fused_cpu=False: on the CPU rehearsal too, the torch ops that run on the GPU (not the numba CPU kernel).
    specs = recipe(cfg.aug.recipe, s["resolution"])
    augs = [Photometric(spec, device=device, dtype=dtype, fused_cpu=False) for spec in specs]
    raw = torch.randint(0, 256, (s["sync_batch"], s["resolution"], s["resolution"], 3), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1)).to(device)

    def operator_only():
        return operator(view1, gen)

    def photometric():
        return [aug(raw) for aug in augs]

    model = TrainModel(method=method, module=method)  # train.py's step, eager (run.compile=false)

    def step():
        train_step(model, optimizer, view1, view2, operator(view1, gen), autocast=dtype if cuda else None,
                   progress=0.5)

    checks = [("sync-free: operator", operator_only, "the MixMask operator (block masks + mix) of the preset"),
              ("sync-free: photometric ops", photometric, f"the {cfg.aug.recipe} views' device photometric ops"),
              ("sync-free: train step", step, "operator + forward + backward + optimizer step + after_step")]
    if cuda:
        for _, fn, _ in checks:  # warm-up: cuDNN autotuning, kernel compilation, lazy optimizer state
            fn()
            fn()
        torch.cuda.synchronize(device)
    what = (f"imagenet-moco-mixmask ({s['arch']}, {s['resolution']} px, batch {s['sync_batch']}, "
            f"{str(dtype).removeprefix('torch.')}, channels_last)")
    rows = []
    for name, fn, desc in checks:
        if not cuda:
            fn()  # the same code at tiny size, unguarded: only CUDA has a sync debug mode
            rows.append(row(name, "skipped", f"needs CUDA (ran unguarded on cpu: {desc})"))
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                fn()
            status, detail = "pass", f"3 calls, no host-device sync: {desc}; {what}"
        except RuntimeError as err:
            status, detail = "fail", f"{str(err).splitlines()[0]}{_where(err)}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append(row(name, status, detail))
    if cuda:  # the logging step's sync, outside the guarded region
        torch.cuda.synchronize(device)
    return rows


def part_ddp(args) -> list[dict]:
    """Run under torchrun with one process: a process group, a collective, and one DDP training step."""
    import torch
    import torch.distributed as dist

    from mixmask.core.distributed import concat_all_gather

    s, device = SIZES[args.size], torch.device(args.device)
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    try:
        x = torch.arange(4, device=device, dtype=torch.float32)
        dist.all_reduce(x)
        gathered = concat_all_gather(x[None])
        ok = x.tolist() == [0.0, 1.0, 2.0, 3.0] and gathered.shape == (1, 4)  # sync point, outside any step
        init_s = time.perf_counter() - t0
        rows = [row("process group, 1 rank", "pass" if ok else "fail",
                    f"init_process_group({backend!r}) under torchrun, all_reduce and all_gather", backend=backend,
                    world_size=dist.get_world_size(), init_s=init_s)]
        dtype = torch.bfloat16 if cuda else torch.float32
        cfg, method, operator, optimizer = _preset_parts(args, s["ddp_batch"])
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if cuda else None, broadcast_buffers=False)  # as train.py wraps it
        view1, view2 = _views(s["ddp_batch"], s["resolution"], device, dtype, seed=2)
        gen = torch.Generator(device=device).manual_seed(0)
        before = [p.detach().clone() for p in method.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        for _ in range(2):  # the loop body of train.py, around DDP (MoCo's shuffle-BN gathers across ranks)
            mixed = operator(view1, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(view1, view2, mixed)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step(0.5)
        loss_value = loss.item()  # sync point
        step_s = (time.perf_counter() - t0) / 2
        changed = sum(not torch.equal(a, p.detach()) for a, p in
                      zip(before, (p for p in method.parameters() if p.requires_grad)))
        ok = changed > 0 and loss_value == loss_value and abs(loss_value) != float("inf")
        rows.append(row("DDP step, 1 rank", "pass" if ok else "fail",
                        f"DistributedDataParallel around {cfg.preset} ({s['arch']}, batch {s['ddp_batch']}), 2 steps",
                        loss=loss_value, params_changed=changed, step_s=step_s))
        return rows
    finally:
        dist.destroy_process_group()


PARTS = {"env": part_env, "peak": part_peak, "kernel": part_kernel, "sync": part_sync, "ddp": part_ddp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.part != "env":
        args.device = "cuda:0"
    rows = PARTS[args.part](args)
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
