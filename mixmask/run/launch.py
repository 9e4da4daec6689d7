"""Process launch for the entry points: torchrun detection, process group, device. (CLI side: reads the env.)

`python train.py` is the single-process path; under torchrun the `RANK`, `LOCAL_RANK` and `WORLD_SIZE` variables
select the process group (`env://`): NCCL with one GPU per local rank, gloo on CPU. `python -m mixmask.run.launch`
is torchrun (same options) with preemption signals passed on to the workers (see `torchrun_main`).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mixmask.errors import UserError


@dataclass
class Launch:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` → cuda:LOCAL_RANK when CUDA is available, else cpu; explicit `cuda` without CUDA is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device={requested!r} but CUDA is not available here; use run.device=cpu or auto")
        if requested == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device(requested)
    if requested != "cpu":
        raise UserError(f"run.device={requested!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def init(requested_device: str) -> Launch:
    """Join the torchrun process group if launched by torchrun; pin the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return Launch(rank=rank, local_rank=local_rank, world_size=world, device=device)


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder `path` and prove a file can be written there, before any work; one UserError line otherwise."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{what}={path} lies under {above}, which is a file; choose another folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{what}={path} is not writable ({err.strerror}); choose a folder you can write to") from None
    return path


def worker_note(workers: int) -> str | None:
    """The one-line note when `data.workers` exceeds the cores this process may use (the loaders cap it)."""
    from pipelines.loaders import fit_workers, usable_cores

    if fit_workers(workers) == workers:
        return None
    return (f"note: data.workers={workers} lowered to {usable_cores()}, the CPU cores this process may use "
            f"(set data.workers<={usable_cores()} to silence this)")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---- `python -m mixmask.run.launch [torchrun options] train.py ...`: torchrun that survives preemption signals
#
# torchrun's agent turns SIGTERM into an exception: it passes the signal on to the workers, waits for them, then
# exits 1 with a traceback, so a job that saved cleanly still looks failed. SIGUSR1, which it does not handle, ends
# it at once (rc 138) and leaves the workers, in their own sessions, training on as orphans. Here both signals
# are forwarded to the workers and the agent keeps waiting: every worker saves at the step all ranks agree on and
# exits 0, so the agent, and the job, end with 0. SIGINT, SIGHUP and SIGQUIT keep torchrun's own handling.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _worker_pids(launcher_pid: int) -> list[int]:
    """The launcher's children that torchrun started as workers (they carry LOCAL_RANK in their environment)."""
    import psutil

    pids = []
    for child in psutil.Process(launcher_pid).children():
        try:
            if "LOCAL_RANK" in child.environ():
                pids.append(child.pid)
        except psutil.AccessDenied:
            pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def torchrun_main(argv: list[str]) -> int:
    """Run torchrun with `argv`, forwarding SIGTERM / SIGUSR1 to its workers instead of ending the launcher."""
    from torch.distributed import run as torchrun

    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        argv = ["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv]
    launcher_pid = os.getpid()

    def forward(signum, frame):
        workers = _worker_pids(launcher_pid)
        if not workers:  # no worker yet (rendezvous): nothing to save, stop like torchrun would
            raise SystemExit(128 + signum)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, forward)
    torchrun.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
