"""GPU acceptance in one command: `make gpu-check` (the same as `python3 scripts/gpu_check.py`).

Every question only a GPU can answer, as a sequence of parts. Each part runs in a fresh process with its own time
limit (one hung part cannot eat the others' time) inside a total budget, and gives one or more rows with pass, fail
or skipped and their figures. The summaries go to $OUT when it is set, else to gpu-check/: gpu-check.json,
gpu-check.md and gpu-check.log (every part's output).

Environment variables:
  GPU_CHECK_DEVICE    cuda (default): the acceptance run, full sizes; cpu: the same sequence at tiny sizes
  GPU_CHECK_BUDGET_S  total seconds (default 480 on cuda, 300 on cpu); a part gets min(its limit, what is left)
  GPU_CHECK_WHEELS    folder of wheels for what the machine lacks (default .gpu-wheels, filled by
                      scripts/gpu_wheels.sh); installed only when missing, into a temporary target
  GPU_CHECK_HIDE      comma-separated modules made unimportable in the parts (rehearse the GPU image here,
                      e.g. ffcv,nvidia.dali)
  GPU_CHECK_PARTS     comma-separated parts to run (default all; env always runs); the others' rows say "skipped"
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check_report import failure_line, write_summaries  # noqa: E402

# Sizes of the bench.py rows per device: cuda is the acceptance run, cpu the rehearsal that keeps the check alive.
PROFILES = {
    "cuda": dict(size="full", budget_s=480, arch="resnet50", stem="--no-cifar-stem", resolution=224, batch=128,
                 dtype="bf16", warmup=3, repeats=10, grid=8, compile="inductor", loader_images=2048,
                 loader_workers=min(8, os.cpu_count() or 1), loader_batches=10, e2e_steps=10, queue_size=65536),
    "cpu": dict(size="tiny", budget_s=300, arch="resnet18", stem="--no-cifar-stem", resolution=32, batch=8,
                dtype="fp32", warmup=1, repeats=2, grid=8, compile="eager", loader_images=64, loader_workers=1,
                loader_batches=2, e2e_steps=2, queue_size=64),
}
HIDE_FINDER = '''import sys
_HIDDEN = {names!r}
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in _HIDDEN):
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by GPU_CHECK_HIDE)", name=name)
        return None
sys.meta_path.insert(0, _Hide())
'''


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


@dataclass
class Check:
    device: str
    profile: dict
    work: Path
    env: dict
    deadline: float
    log_path: Path
    found: dict = field(default_factory=dict)  # figures that later parts use (env, peak, the step rows)
    limit_s: float = 0.0  # the running part's time left

    def run(self, label: str, argv: list[str], *, cwd: Path | None = None, extra_env: dict | None = None) -> Result:
        """Run one command in its own process group, killed with its children at the part's limit."""
        limit = max(1.0, self.limit_s)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd or self.work, env={**self.env, **(extra_env or {})}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limit)
            result = Result(proc.returncode, out, err, time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            result = Result(None, out, err, time.monotonic() - t0, timed_out=True)
        self.limit_s -= result.seconds
        with self.log_path.open("a") as log:
            log.write(f"\n===== {label}: {' '.join(argv)}\n----- rc={result.rc} in {result.seconds:.1f}s"
                      f"{' (time limit)' if result.timed_out else ''}\n{out[-100_000:]}\n----- stderr\n"
                      f"{err[-100_000:]}\n")
        return result

    def part(self, name: str, *args: str, extra_env: dict | None = None) -> tuple[list[dict] | None, Result]:
        """An in-process part of scripts/gpu_check_parts.py: its rows, or None when it failed."""
        out = self.work / f"{name}.json"
        argv = [sys.executable, str(ROOT / "scripts" / "gpu_check_parts.py"), name, "--device", self.device,
                "--size", self.profile["size"], "--out", str(out), *args]
        result = self.run(name, argv, extra_env=extra_env)
        return (json.loads(out.read_text()) if result.rc == 0 and out.is_file() else None), result

    def bench(self, name: str, *args: str) -> tuple[list[dict] | None, Result]:
        """`bench.py` with --json: its result rows, or None when it failed."""
        out = self.work / f"bench-{name}.json"
        argv = [sys.executable, str(ROOT / "bench.py"), *args, "--device", self.device, "--json", str(out)]
        result = self.run(f"bench {name}", argv)
        return (json.loads(out.read_text())["results"] if result.rc == 0 and out.is_file() else None), result


class PartFailed(Exception):
    def __init__(self, result: Result, what: str):
        super().__init__(what)
        self.result, self.what = result, what


def _need(rows, result: Result, what: str):
    if rows is None:
        raise PartFailed(result, what)
    return rows


def _row(name: str, status: str, detail: str = "", **figures) -> dict:
    return {"name": name, "status": status, "figures": figures, "detail": detail}


# ---- the parts, in the order they run (cheap and essential first; the compile row, the costliest, last)

def part_env(c: Check) -> list[dict]:
    rows, result = c.part("env")
    rows = _need(rows, result, "env part")
    c.found["env"] = rows[0]["figures"]
    return rows


def part_simple(name: str):
    def run(c: Check) -> list[dict]:
        extra = {"NUMBA_ENABLE_CUDASIM": "1"} if name == "kernel" and c.device == "cpu" else None
        rows, result = c.part(name, extra_env=extra)
        rows = _need(rows, result, f"{name} part")
        if name == "peak":
            c.found["peak_tflops"] = rows[0]["figures"]["tflops"]
        return rows
    return run


def _step_args(c: Check, branches: str) -> list[str]:
    p = c.profile
    return ["step", "--methods", "moco", "--branches", branches, "--arch", p["arch"], p["stem"], "--resolution",
            str(p["resolution"]), "--batch-size", str(p["batch"]), "--dtype", p["dtype"], "--warmup",
            str(p["warmup"]), "--repeats", str(p["repeats"])]


def _step_row(c: Check, r: dict, name: str) -> dict:
    p, peak = c.profile, c.found.get("peak_tflops")
    figures = {"images_per_s": r["images_per_s"], "ms_per_step": r["ms_per_call"], "tflops": r["tflops"],
               "forward_equivalents": r["forward_equivalents"], "gflops_per_image": r["backbone_gflops_per_image"]}
    if peak:  # model-only compute bound: the measured peak over (forward FLOPs x forward-equivalents) per image
        figures["limit_images_per_s"] = peak * 1e12 / (r["backbone_gflops_per_image"] * 1e9 * r["forward_equivalents"])
        figures["ratio_to_limit"] = r["tflops"] / peak
    if "compile_s" in r:
        figures["compile_s"] = r["compile_s"]
        eager = c.found.get("step", {}).get(r["branch"])
        if eager:
            figures["speedup_vs_eager"] = r["images_per_s"] / eager["images_per_s"]
    detail = (f"bench.py step: {p['arch']}, {p['resolution']} px, batch {p['batch']}, {p['dtype']}, channels_last, "
              "device-resident synthetic batches")
    return _row(name, "pass", detail, **figures)


def part_step(c: Check) -> list[dict]:
    results, res = c.bench("step", *_step_args(c, "vanilla,mixmask,mixmask-unmix"))
    c.found["step"] = {r["branch"]: r for r in _need(results, res, "bench.py step")}
    return [_step_row(c, c.found["step"][b], f"step moco/{b}") for b in ("vanilla", "mixmask", "mixmask-unmix")]


def part_compile(c: Check) -> list[dict]:
    results, res = c.bench("compile", *_step_args(c, "mixmask"), "--compile", c.profile["compile"])
    row = _step_row(c, _need(results, res, "bench.py step --compile")[0], "step moco/mixmask compiled")
    row["detail"] = f"run.compile=true (torch.compile backend {c.profile['compile']}); " + row["detail"]
    return [row]


def part_masks(c: Check) -> list[dict]:
    p = c.profile
    results, res = c.bench("masks", "masks", "--batch-sizes", str(p["batch"]), "--resolutions", str(p["resolution"]),
                           "--grids", str(p["grid"]), "--warmup", str(p["warmup"]), "--repeats", str(p["repeats"]))
    r = next(r for r in _need(results, res, "bench.py masks") if r["name"] == "mask+mix/per-sample")
    figures = {"ms_per_batch": r["ms_per_call"], "images_per_s": r["images_per_s"]}
    step = c.found.get("step", {}).get("mixmask")
    if step:  # both at the same batch size
        figures["share_of_mixmask_step"] = r["ms_per_call"] / step["ms_per_call"]
    return [_row("masks + mix share of the step", "pass",
                 f"bench.py masks: per-sample block masks + mix, batch {p['batch']}, {p['resolution']} px, grid "
                 f"{p['grid']}, fp32 images, against the moco/mixmask step time", **figures)]


def part_ddp(c: Check) -> list[dict]:
    out = c.work / "ddp.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(ROOT / "scripts" / "gpu_check_parts.py"), "ddp", "--device", c.device, "--size",
            c.profile["size"], "--out", str(out)]
    result = c.run("ddp (torchrun)", argv)
    return _need(json.loads(out.read_text()) if result.rc == 0 and out.is_file() else None, result, "torchrun ddp")


def part_pytest(c: Check) -> list[dict]:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", str(ROOT / "tests")]
    result = c.run("pytest -m gpu", argv, cwd=ROOT)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", result.stdout)}
    if result.timed_out or result.rc not in (0, 1, 5) or not counts:
        raise PartFailed(result, "pytest -m gpu")
    figures = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped")}
    figures["errors"] = counts.get("error", 0) + counts.get("errors", 0)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    if result.rc == 1:
        return [_row("pytest -m gpu", "fail", f"failed: {', '.join(failed)[:350]}", **figures)]
    reasons = sorted({m.strip() for m in re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", result.stdout, re.M)})
    detail = "the `gpu` marker" + (f"; skipped: {'; '.join(reasons)[:300]}" if reasons else "")
    return [_row("pytest -m gpu", "pass", detail, **figures)]


def part_loader(backend: str):
    def run(c: Check) -> list[dict]:
        names = [f"{backend} loader to the device", f"e2e {backend}"]
        if not c.found.get("env", {}).get(f"{backend}_imports"):
            return [_row(n, "skipped", f"{backend} does not import here") for n in names]
        p = c.profile
        results, res = c.bench(f"loader-{backend}", "loader", "--backend", backend, "--source", "synthetic",
                               "--resolution", str(p["resolution"]), "--batch-size", str(p["batch"]), "--workers",
                               str(p["loader_workers"]), "--batches", str(p["loader_batches"]), "--num-images",
                               str(p["loader_images"]), "--warmup", str(p["warmup"]), "--repeats", str(p["repeats"]))
        r = _need(results, res, f"bench.py loader --backend {backend}")[0]
        rows = [_row(names[0], "pass", f"bench.py loader: synthetic, {p['resolution']} px, batch {p['batch']}, "
                     f"{p['loader_workers']} workers, mocov2, to normalised views on {c.device}",
                     images_per_s=r["images_per_s"])]
        overrides = [f"data.backend={backend}", "data.source=synthetic", f"data.resolution={p['resolution']}",
                     f"data.batch_size={p['batch']}", f"data.workers={p['loader_workers']}",
                     f"data.synthetic_images={p['loader_images']}", "data.synthetic_val_images=16",
                     f"method.arch={p['arch']}", f"method.cifar_stem={str(p['stem'] == '--cifar-stem').lower()}",
                     f"method.moco.queue_size={p['queue_size']}", "run.knn_every=0"]
        results, res = c.bench(f"e2e-{backend}", "e2e", "--steps", str(p["e2e_steps"]), "--warmup",
                               str(p["warmup"]), "--repeats", str(p["repeats"]), "--preset", "imagenet-moco-mixmask",
                               *overrides)
        if results is None:  # the loader row stands on its own
            return rows + [_row(names[1], "fail", failure_line(res, f"bench.py e2e data.backend={backend}",
                                                               c.found.get("env", {})))]
        r = results[0]
        rows.append(_row(names[1], "pass", f"bench.py e2e: imagenet-moco-mixmask on synthetic data, {p['arch']}, "
                         f"{p['resolution']} px, batch {p['batch']}", images_per_s=r["images_per_s"],
                         data_wait_share=r["data_wait"]))
        return rows
    return run


PARTS = [  # (name, rows it gives, time limit in seconds on cuda / on cpu, function)
    ("env", ["environment"], (90, 90), part_env),
    ("peak", ["matmul peak"], (60, 45), part_simple("peak")),
    ("kernel", ["mask kernel: CUDA = CPU", "mask kernel: 256 masks"], (90, 60), part_simple("kernel")),
    ("sync", ["sync-free: operator", "sync-free: photometric ops", "sync-free: train step"], (150, 90),
     part_simple("sync")),
    ("step", ["step moco/vanilla", "step moco/mixmask", "step moco/mixmask-unmix"], (150, 90), part_step),
    ("masks", ["masks + mix share of the step"], (60, 45), part_masks),
    ("ddp", ["process group, 1 rank", "DDP step, 1 rank"], (120, 90), part_ddp),
    ("pytest", ["pytest -m gpu"], (180, 120), part_pytest),
    ("ffcv", ["ffcv loader to the device", "e2e ffcv"], (150, 120), part_loader("ffcv")),
    ("dali", ["dali loader to the device", "e2e dali"], (150, 120), part_loader("dali")),
    ("compile", ["step moco/mixmask compiled"], (300, 120), part_compile),
]


def _wheel_path(c_env: dict, work: Path, wheels: Path) -> str:
    """Install the carried wheels whose distributions are missing, or present in another version (an antlr4 runtime
    other than omegaconf's 4.9 breaks its parser), into a temporary target ahead on the path; a note for the log."""
    import importlib.metadata

    missing = []
    for whl in sorted(wheels.glob("*.whl")):
        dist, version = whl.name.split("-")[:2]
        try:
            if importlib.metadata.version(dist) != version:
                missing.append(whl)
        except importlib.metadata.PackageNotFoundError:
            missing.append(whl)
    if not missing:
        return ""
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(target), *map(str, missing)], check=True, env=c_env)
    c_env["PYTHONPATH"] = os.pathsep.join([str(target), c_env["PYTHONPATH"]])
    return f"installed {', '.join(w.name for w in missing)} into a temporary target"


def _child_env(device: str, work: Path) -> dict:
    """The parts' environment: the checkout on the path, the CPU pinned for the rehearsal, hidden modules."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal stays on the CPU even on a GPU machine
        env["OMP_NUM_THREADS"] = "1"  # a rehearsal, not a measurement: leave the other cores to the loader threads
    if os.environ.get("GPU_CHECK_HIDE"):
        (work / "hide").mkdir()
        names = [n.strip() for n in os.environ["GPU_CHECK_HIDE"].split(",") if n.strip()]
        (work / "hide" / "sitecustomize.py").write_text(HIDE_FINDER.format(names=names))
        env["PYTHONPATH"] = os.pathsep.join([str(work / "hide"), env["PYTHONPATH"]])
    return env


def run_part(check: Check, name: str, expected: list[str], limit_s: float, fn) -> tuple[list[dict], dict]:
    """One part within min(its limit, the budget left): its rows (every expected one on failure) and its timing."""
    left = check.deadline - time.monotonic()
    check.limit_s = min(limit_s, left)
    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    no_cuda = check.device == "cuda" and check.found.get("env", {}).get("cuda_available") is False
    if left < 5 or no_cuda:
        why = "no CUDA device (GPU_CHECK_DEVICE=cpu rehearses on the CPU)" if no_cuda else "out of the time budget"
        rows, status = [_row(n, "skipped", why) for n in expected], "skipped"
    else:
        try:
            rows, status = fn(check), "ran"
        except PartFailed as err:
            line = failure_line(err.result, err.what, check.found.get("env", {}))
            rows, status = [_row(n, "fail", line) for n in expected], "failed"
        except Exception as err:  # a bug in this script: say so on every row of the part, keep going
            rows = [_row(n, "fail", f"gpu_check.py: {type(err).__name__}: {err}") for n in expected]
            status = "failed"
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"part": name, "status": status, "seconds": round(time.monotonic() - t0, 1),
              "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
              "limit_s": round(min(limit_s, max(left, 0)), 1)}
    for r in rows:
        r["part"] = name
    return rows, timing


def main() -> int:
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if device not in PROFILES:
        print(f"error: GPU_CHECK_DEVICE={device!r} is not valid; valid: cuda, cpu", file=sys.stderr)
        return 2
    profile = PROFILES[device]
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", profile["budget_s"]))
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "gpu-check"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.log").write_text("")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = _child_env(device, work)
    t_start, notes = time.monotonic(), []
    wheels = ROOT / os.environ.get("GPU_CHECK_WHEELS", ".gpu-wheels")
    if wheels.is_dir():
        try:
            notes.append(_wheel_path(env, work, wheels))
        except subprocess.CalledProcessError as err:
            notes.append(f"installing the wheels of {wheels} failed ({err})")
    check = Check(device, profile, work, env, t_start + budget, out / "gpu-check.log")
    rows, parts = [], []
    selected = {p.strip() for p in os.environ.get("GPU_CHECK_PARTS", "").split(",") if p.strip()}
    unknown = selected - {name for name, *_ in PARTS}
    if unknown:
        print(f"error: GPU_CHECK_PARTS names {', '.join(sorted(unknown))}; valid: "
              f"{', '.join(name for name, *_ in PARTS)}", file=sys.stderr)
        return 2
    for name, expected, limits, fn in PARTS:
        if selected and name not in selected | {"env"}:
            rows += [_row(n, "skipped", "not in GPU_CHECK_PARTS") | {"part": name} for n in expected]
            continue
        got, timing = run_part(check, name, expected, limits[0 if device == "cuda" else 1], fn)
        rows += got
        parts.append(timing)
        print(f"[gpu-check] {name}: {timing['status']} in {timing['seconds']}s", flush=True)
    summary = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
               "profile": profile["size"], "budget_s": budget, "total_s": round(time.monotonic() - t_start, 1),
               "notes": [n for n in notes if n], "parts": parts, "rows": rows}
    print(write_summaries(summary, out))
    if not os.environ.get("GPU_CHECK_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
