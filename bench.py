"""Throughput benchmark: `python bench.py {loader,masks,step,e2e} [options] --json FILE`.

Every mode follows one protocol (mixmask/benchmarking/protocol.py): warm-up, repeats, the median with the min-max
spread, CUDA-event timing on GPU, and the reference each number is compared to measured in the same invocation.
The JSON holds the config, versions, device and commit beside a `results` list of rows (`name`, `images_per_s`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mixmask.errors import UserError, cli_entry
from mixmask.run.config_cli import add_config_arguments, config_from_args, to_dict
from mixmask.run.launch import pick_device
from mixmask.run.provenance import provenance
from mixmask.run.step import PRECISIONS, autocast_dtype, enable_fast_kernels, prepare_model, train_step


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--warmup", type=int, default=3, help="untimed repeats")
        p.add_argument("--repeats", type=int, default=10, help="timed repeats")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
        p.add_argument("--json", type=Path, default=None, help="write the results here")

    p = sub.add_parser("loader", help="two-view loader throughput per backend, vs the official torchvision recipe")
    common(p)
    p.add_argument("--backend", type=_strs, default=["ffcv", "dali", "torchvision"], help="comma-separated")
    p.add_argument("--source", default="synthetic",
                   help="synthetic | cifar100 | tinyimagenet | imagefolder | wds (the images also as shards)")
    p.add_argument("--data", default=None, help=".beton (ffcv) or dataset root (dali/torchvision)")
    p.add_argument("--data-beton", default=None, help="the .beton of the same data for ffcv when --data is a folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--recipe", default="mocov2")
    p.add_argument("--batches", type=int, default=10, help="batches per timed repeat")
    p.add_argument("--num-images", type=int, default=1024, help="synthetic source: images generated")
    p.add_argument("--shard-samples", type=int, default=1000, help="wds: samples per shard when writing them")
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="wds: the readers' shuffle buffer")
    p.add_argument("--ffcv-orders", type=_strs, default=["random"],
                   help="ffcv: comma-separated orders, one row each (random, quasi_random)")
    p.add_argument("--os-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="ffcv: read through the OS page cache (--no-os-cache: ffcv's own, as past RAM)")
    p.add_argument("--order-window", type=int, default=8192, help="ffcv quasi_random: samples shuffled together")
    p.add_argument("--make-photos", type=int, default=0, metavar="N",
                   help="imagefolder source: first write N ~500x375 JPEGs from scikit-image's photographs to --data")

    p = sub.add_parser("masks", help="per-sample masks + mix vs the official per-batch path")
    common(p)
    p.add_argument("--batch-sizes", type=_ints, default=[256])
    p.add_argument("--resolutions", type=_ints, default=[32, 64, 224])
    p.add_argument("--grids", type=_ints, default=[2, 4, 8])

    p = sub.add_parser("step", help="one training step per method x branch on synthetic tensors")
    common(p)
    p.add_argument("--methods", type=_strs, default=["moco", "simclr", "byol", "simsiam"])
    p.add_argument("--branches", type=_strs, default=["vanilla", "mixmask", "mixmask-unmix"])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp32: as run.precision")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the method (backend: inductor unless named); first step's time is compile_s")

    p = sub.add_parser("e2e", help="loader + operator + train step of a preset: images/s and data-wait share")
    common(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--compile-backend", default="inductor",
                   help="the torch.compile backend when the config says run.compile=true (as train.py: inductor)")
    add_config_arguments(p)
    return parser


def _print_table(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    extra = [k for k in ("ratio_vs_official", "ratio_vs_torchvision", "data_wait", "forward_equivalents",
                         "tflops", "compile_s") if any(k in r for r in rows)]
    for col in ("name", "images/s (median)", "min - max", "ms/call", *extra):
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        details = ", ".join(f"{key}={r[key]}" for key in ("batch_size", "resolution", "grid_size", "workers")
                            if key in r)
        cells = [f"{r['name']} ({details})" if details else r["name"], f"{r['images_per_s']:,.0f}",
                 f"{r.get('images_per_s_min', float('nan')):,.0f} - {r.get('images_per_s_max', float('nan')):,.0f}",
                 f"{r.get('ms_per_call', float('nan')):.3f}"]
        for k in extra:
            v = r.get(k)
            cells.append("" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        table.add_row(*cells)
    console.print(table)


def _synthetic_beton(synthetic: dict) -> Path:
    """The synthetic images as a .beton under data/bench/ (written once) for the ffcv backend."""
    from pipelines.convert import convert
    from pipelines.synthetic import GENERATOR_VERSION

    name = f"synthetic-v{GENERATOR_VERSION}-{synthetic['resolution']}px-{synthetic['num_images']}.beton"
    out = Path("data/bench") / name
    if not out.is_file():
        convert("synthetic", out, split="train", **synthetic)
    return out


def _folder_beton(source: str, root: str) -> Path:
    """A dataset folder as a JPEG-mode .beton under data/bench/ (written once) for the ffcv backend."""
    from pipelines.convert import convert

    out = Path("data/bench") / f"{source}-{Path(root).resolve().name}-jpg.beton"
    if not out.is_file():
        convert(source, out, root=root, split="train", write_mode="jpg", jpeg_quality=90)
    return out


def run_e2e(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    """Loader → operator → train.py's `train_step` of a config (run.compile, run.precision and run.channels_last
    included), timed over `--steps` steps per repeat, with the data-wait share."""
    from mixmask.benchmarking.protocol import Measurement
    from mixmask.run.build import build_loaders, build_method_from_config, build_operator
    from mixmask.run.config import derived
    from mixmask.run.launch import Launch
    from mixmask.run.optim import build_optimizer
    from pipelines.prepare import prepare_data

    cfg = config_from_args(args)
    cfg.run.device, cfg.run.knn_every = str(device), 0
    run = Launch(rank=0, local_rank=0, world_size=1, device=device)
    autocast = autocast_dtype(cfg.run.precision, device)
    data = prepare_data(cfg.data, is_main=True, barrier=lambda: None, log=lambda s: None)
    computed = derived(cfg, 1)
    loader, _ = build_loaders(cfg, data, run, computed["batch_size_per_rank"], autocast)
    model = prepare_model(build_method_from_config(cfg), device, channels_last=cfg.run.channels_last,
                          compile_backend=args.compile_backend if cfg.run.compile else None)
    operator = build_operator(cfg)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    optimizer = build_optimizer(cfg.optim.name, model.method, lr=computed["lr"], weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum, decay_norm_and_bias=cfg.optim.decay_norm_and_bias)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()

    def run_steps(n: int) -> tuple[float, float]:
        wait, t0 = 0.0, time.perf_counter()
        for _ in range(n):
            tw = time.perf_counter()
            batch = next(stream)
            wait += time.perf_counter() - tw
            mixed = operator(batch.view1, gen)
            train_step(model, optimizer, batch.view1, batch.view2, mixed, autocast=autocast, progress=0.5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, wait

    for _ in range(args.warmup):
        run_steps(1)
    samples = [run_steps(args.steps) for _ in range(args.repeats)]
    times = sorted(t for t, _ in samples)
    m = Measurement(name=f"e2e {cfg.data.backend} {cfg.method.name}/{cfg.method.branch}",
                    items_per_call=args.steps * computed["global_batch"], median_s=times[len(times) // 2],
                    min_s=times[0], max_s=times[-1], repeats=args.repeats)
    wait_share = sum(w for _, w in samples) / sum(t for t, _ in samples)
    row = m.row(data_wait=wait_share, backend=cfg.data.backend, preset=cfg.preset, compiled=cfg.run.compile,
                channels_last=cfg.run.channels_last, precision="bf16" if autocast else "fp32")
    return [row], to_dict(cfg)


def run_loader_mode(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every backend's two-view loader on the same images (and wds shards), each row's ratio to torchvision."""
    from mixmask.benchmarking.loader import run_loader_bench

    rows: list[dict] = []
    if args.make_photos:
        from mixmask.benchmarking.photos import make_photo_folder

        if args.source not in ("imagefolder", "wds") or not args.data:
            raise UserError("--make-photos needs --source imagefolder and --data DIR")
        make_photo_folder(args.data, args.make_photos)
    if args.source not in ("synthetic", "wds") and not args.data:
        raise UserError(f"--source {args.source} needs --data (a dataset root; ffcv also --data-beton)")
    synthetic = None
    if args.source in ("synthetic", "wds") and not args.data:
        synthetic = dict(num_images=args.num_images, num_classes=10, resolution=args.resolution, seed=0)
    if args.source == "wds":
        from mixmask.benchmarking.loader_wds import wds_runs

        for r in wds_runs(args.backend, data=args.data, data_beton=args.data_beton, synthetic=synthetic,
                          shard_samples=args.shard_samples,
                          beton_of=lambda src, x: _synthetic_beton(x) if src == "synthetic" else _folder_beton(
                              src, x)):
            rows += run_loader_bench(r.backend, source=r.source, path=r.path, resolution=args.resolution,
                                     batch_size=args.batch_size, workers=args.workers, recipe=args.recipe,
                                     device=device, warmup_batches=args.warmup, batches=args.batches,
                                     repeats=args.repeats, synthetic=r.synthetic, storage=r.storage,
                                     shuffle_buffer=args.shuffle_buffer)
    for backend in args.backend if args.source != "wds" else []:
        path = args.data_beton if backend == "ffcv" and args.data_beton else args.data
        if backend == "ffcv" and synthetic is not None and path is None:
            path = str(_synthetic_beton(synthetic))
        elif backend == "ffcv" and not args.data_beton:
            path = str(_folder_beton(args.source, args.data))
        for order in args.ffcv_orders if backend == "ffcv" else ["random"]:
            rows += run_loader_bench(backend, source=args.source, path=path, resolution=args.resolution,
                                     batch_size=args.batch_size, workers=args.workers, recipe=args.recipe,
                                     device=device, warmup_batches=args.warmup, batches=args.batches,
                                     repeats=args.repeats, synthetic=synthetic, order=order,
                                     os_cache=args.os_cache, order_window=args.order_window)
    ref = next((r["images_per_s"] for r in rows if r.get("backend") == "torchvision"), None)
    if ref:
        for r in rows:
            r["ratio_vs_torchvision"] = r["images_per_s"] / ref
    return rows


def _check_args(args: argparse.Namespace) -> None:
    """Every number and name the mode uses, checked before any work (one line each, via UserError)."""
    from mixmask.errors import choice_error
    from mixmask.run.config import BACKENDS, BRANCHES, METHOD_NAMES

    def at_least(flag: str, values, low: int) -> None:
        for v in values if isinstance(values, list) else [values]:
            if v < low:
                raise UserError(f"{flag} {v} is not valid: it must be at least {low}")

    at_least("--warmup", args.warmup, 0)
    at_least("--repeats", args.repeats, 1)
    at_least("--threads", args.threads, 0)
    if args.mode == "masks":
        at_least("--batch-sizes", args.batch_sizes, 1)
        at_least("--resolutions", args.resolutions, 1)
        at_least("--grids", args.grids, 1)
        for res in args.resolutions:
            for grid in args.grids:
                if grid > res:
                    raise UserError(f"--grids {grid} is finer than --resolutions {res}: a grid cell needs a pixel")
    if args.mode == "step":
        for name in args.methods:
            if name not in METHOD_NAMES:
                raise choice_error("method (--methods)", name, METHOD_NAMES)
        for name in args.branches:
            if name not in BRANCHES:
                raise choice_error("branch (--branches)", name, BRANCHES)
        if args.arch not in ("resnet18", "resnet50"):
            raise choice_error("architecture (--arch)", args.arch, ("resnet18", "resnet50"))
        at_least("--resolution", args.resolution, 8)
        at_least("--batch-size", args.batch_size, 2)
        if args.dtype not in PRECISIONS:
            raise choice_error("dtype (--dtype)", args.dtype, PRECISIONS)
    if args.mode == "loader":
        for name in args.backend:
            if name not in BACKENDS:
                raise choice_error("loader backend (--backend)", name, BACKENDS)
        from pipelines.loaders.order import ORDERS

        for name in args.ffcv_orders:
            if name not in ORDERS:
                raise choice_error("ffcv order (--ffcv-orders)", name, ORDERS)
        at_least("--order-window", args.order_window, 1)
        at_least("--resolution", args.resolution, 8)
        at_least("--batch-size", args.batch_size, 1)
        at_least("--workers", args.workers, 0)
        at_least("--batches", args.batches, 1)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.mode == "loader":
        from mixmask.run.launch import worker_note
        from pipelines.loaders import fit_workers

        if note := worker_note(args.workers):  # the rows must show the count that ran, not the one asked for
            print(note.replace("data.workers", "--workers"), file=sys.stderr)
            args.workers = fit_workers(args.workers)
    device = pick_device(args.device, 0)
    if device.type == "cuda":
        # As train.py does (mixmask.run.launch): FFCV's current stream and numba's context follow the current device.
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode in ("step", "e2e"):
        enable_fast_kernels(device)  # as train.py: cuDNN autotuning and TF32 on CUDA
    console = Console(width=None if sys.stdout.isatty() else 160)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    if args.mode == "masks":
        from mixmask.benchmarking.masks import run_masks_bench

        rows = run_masks_bench(device, batch_sizes=tuple(args.batch_sizes), resolutions=tuple(args.resolutions),
                               grids=tuple(args.grids), warmup=args.warmup, repeats=args.repeats)
    elif args.mode == "step":
        from mixmask.benchmarking.step import run_step_bench

        dtype = autocast_dtype(args.dtype, device) or torch.float32
        rows = run_step_bench(args.methods, args.branches, arch=args.arch, cifar_stem=args.cifar_stem,
                              resolution=args.resolution, batch_size=args.batch_size, device=device, dtype=dtype,
                              warmup=args.warmup, repeats=args.repeats, compile_backend=args.compile)
    elif args.mode == "loader":
        rows = run_loader_mode(args, device)
    else:
        rows, cfg_dict = run_e2e(args, device)
        settings["config"] = cfg_dict
    _print_table(console, f"bench.py {args.mode} on {provenance(device)['device']}", rows)
    if args.json is not None:
        report = {"mode": args.mode, "settings": settings, **provenance(device), "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(args.json)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
