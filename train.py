"""MixMask self-supervised training: `python train.py --preset NAME [--config FILE] [key=value ...]`.

Single process with `python train.py`; data-parallel with `torchrun --nproc_per_node N train.py ...` (env://,
NCCL on GPU, gloo on CPU). Reads top to bottom: config → launch → `train`'s stages: setup (run dir, lock, resume
check) → build (data, loaders, method, operator, optimizer) → resume → epochs of `train_step` → finish.
Rank 0 alone writes files and draws the progress view; every rank runs the same number of steps.
"""

from __future__ import annotations

import argparse
import enum
import functools
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixmask.core.schedule import lr_at
from mixmask.errors import cli_entry
from mixmask.run import checkpoint as ckpt_io
from mixmask.run import launch, rundir
from mixmask.run.build import (
    KnnLoaders,
    build_loaders,
    build_method_from_config,
    build_operator,
    knn_monitor,
    write_run_artifacts,
)
from mixmask.run.config import Config, derived, method_shape
from mixmask.run.config_cli import add_config_arguments, config_from_args, to_yaml
from mixmask.run.metrics import MetricsWriter, drop_records_after
from mixmask.run.optim import build_optimizer, set_lr
from mixmask.run.progress import ProgressView
from mixmask.run.provenance import provenance
from mixmask.run.step import TrainModel, autocast_dtype, enable_fast_kernels, prepare_model, train_step
from pipelines.prepare import prepare_data

if TYPE_CHECKING:
    from mixmask.batches import TwoViewBatch
    from mixmask.core.operator import MixingOperator
    from pipelines.loaders import TwoViewLoader


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption); the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, run: launch.Launch, nonfinite: torch.Tensor | None = None) -> tuple[bool, bool]:
        """(stop, nonfinite) agreed by all ranks: a collective, so every rank calls it at the same step."""
        flags = torch.stack([torch.tensor(1.0 if self.signal_name else 0.0, device=run.device),
                             (nonfinite if nonfinite is not None else torch.tensor(False, device=run.device)).float()])
        if run.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, bad = flags.tolist()  # sync point
        return stop > 0, bad > 0


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return args, config_from_args(args)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    run = launch.init(cfg.run.device)
    try:
        return train(cfg, run)
    finally:
        launch.shutdown()


class Outcome(enum.Enum):
    """Why training stopped (an epoch that ends or reaches run.max_steps returns DONE)."""

    DONE = "done"  # all epochs, or run.max_steps: the run's outputs are written, exit 0
    SIGNAL = "signal"  # SIGTERM / SIGUSR1: a checkpoint is saved, exit 0, the same command resumes
    NONFINITE = "nonfinite"  # the loss became inf / NaN: exit 3, the last good checkpoint is kept


@dataclass
class Position:
    """Where the run is: `step_in_epoch` batches into `epoch` (after a resume: where that epoch starts)."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    loader_state: dict | None = None  # the loader's own position (DALI's random state) for a mid-epoch resume


@dataclass
class LogWindow:
    """The steps since the last log line: wall time, time spent waiting for the loader, and on-device loss sums."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    nonfinite: torch.Tensor | None = None

    def timed(self, batches: Iterator[TwoViewBatch]) -> Iterator[TwoViewBatch]:
        """The batches of `batches`, the wait for each added to `wait`."""
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - t_wait
            if batch is None:
                return
            yield batch

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's detached terms on the device: no sync until the log step."""
        bad = ~torch.isfinite(terms["loss"])
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
        self.steps += 1

    def stats(self, global_batch: int) -> dict[str, float]:
        """Mean terms, images/s and the data-wait share of the window (`.item()`: a sync point)."""
        elapsed = time.perf_counter() - self.t0
        stats = {name: (total / self.steps).item() for name, total in self.sums.items()}
        stats.update(images_per_s=self.steps * global_batch / elapsed, data_wait=self.wait / elapsed)
        return stats

    def reset(self) -> None:
        self.t0, self.wait, self.steps, self.sums, self.nonfinite = time.perf_counter(), 0.0, 0, {}, None


@dataclass
class Training:
    """What `build` makes from the config and the stages share: data, model, optimizer, outputs, signals."""

    cfg: Config
    run: launch.Launch
    run_dir: Path
    lock: rundir.RunLock | None  # held for the whole run
    view: ProgressView
    computed: dict
    train_loader: TwoViewLoader
    knn: KnnLoaders | None
    model: TrainModel
    operator: MixingOperator
    mask_gen: torch.Generator
    optimizer: torch.optim.Optimizer
    autocast: torch.dtype | None
    checkpointer: ckpt_io.Checkpointer
    metrics: MetricsWriter = field(init=False)  # opened by start_logging, once metrics.jsonl is cut back
    stop: StopRequest = field(init=False)  # installed by start_logging: a signal during setup ends the process

    def lr_at(self, step: int) -> float:
        c, o = self.computed, self.cfg.optim
        return lr_at(step, total_steps=c["total_steps"], warmup_steps=round(o.warmup_epochs * c["steps_per_epoch"]),
                     peak_lr=c["lr"], schedule=o.schedule, milestones=o.milestones)


def train(cfg: Config, run: launch.Launch) -> int:
    """Train `cfg` on this process's share of the run; the exit code (0, or 3 for a non-finite loss)."""
    torch.manual_seed(cfg.run.seed + run.rank)
    enable_fast_kernels(run.device)
    view = ProgressView(0, is_main=run.is_main, show_steps=False)
    run_dir, lock, resume_path, resume_notes = setup(cfg, run, view)
    t = build(cfg, run, run_dir, lock, view)
    pos = resume(t, resume_path, resume_notes)
    start_logging(t, pos)
    outcome = run_epochs(t, pos)
    return finish(t, pos, outcome)


def setup(cfg: Config, run: launch.Launch, view: ProgressView):
    """Lock the run directory and find the checkpoint to resume from; refuse one that would change the run.

    Returns (run dir, its lock, checkpoint path or None, notes on the config keys a resume deliberately changed).
    """
    run_dir = Path(cfg.run.out_dir or f"runs/{cfg.preset or 'custom'}")
    ckpt_dir = run_dir / "checkpoints"
    # One run per directory; a folder that cannot be written is one line now, on every rank.
    lock = rundir.lock_run_dir(run_dir, pid=os.getpid(), is_main=run.is_main, distributed=run.distributed,
                               prepare=functools.partial(_make_run_dir, run_dir))
    rundir.refuse_fresh_start_over(ckpt_dir, cfg.run.resume)
    resume_path = ckpt_io.find_resume(cfg.run.resume, ckpt_dir)
    notes: list[str] = []
    if resume_path is not None:  # checked before any work; the weights are restored once the method exists
        stored = ckpt_io.load_checkpoint(resume_path, map_location="cpu")["config"]
        notes = rundir.check_resume_config(stored, _config_dict(cfg), checkpoint=resume_path,
                                           allow_change=cfg.run.allow_config_change)
    if note := launch.worker_note(cfg.data.workers):
        view.message(note)
    return run_dir, lock, resume_path, notes


def _make_run_dir(run_dir: Path) -> None:
    launch.check_writable_dir(run_dir, "run.out_dir")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)


def build(cfg: Config, run: launch.Launch, run_dir: Path, lock: rundir.RunLock | None,
          view: ProgressView) -> Training:
    """Data (the synthetic default is converted on first use, by rank 0), loaders, method, operator, optimizer."""
    data = prepare_data(cfg.data, is_main=run.is_main, barrier=launch.barrier, log=view.message)
    autocast = autocast_dtype(cfg.run.precision, run.device)
    batch_size_per_rank = derived(cfg, run.world_size)["batch_size_per_rank"]
    train_loader, knn = build_loaders(cfg, data, run, batch_size_per_rank, autocast)
    computed = derived(cfg, run.world_size, len(train_loader))  # the loader refuses an epoch without a full batch
    if note := cfg.method.params.launch_note(method_shape(cfg, run.world_size)):
        view.message(note)
    model = prepare_model(build_method_from_config(cfg, world_size=run.world_size), run.device,
                          channels_last=cfg.run.channels_last, compile_backend="inductor" if cfg.run.compile else None,
                          sync_bn=cfg.method.sync_bn, distributed=run.distributed)
    mask_gen = torch.Generator(device=run.device)
    mask_gen.manual_seed(cfg.run.seed * 1000 + run.rank)
    optimizer = build_optimizer(cfg.optim.name, model.method, lr=computed["lr"],
                                weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                                decay_norm_and_bias=cfg.optim.decay_norm_and_bias)
    checkpointer = ckpt_io.Checkpointer(run_dir / "checkpoints", method=model.method, optimizer=optimizer,
                                        mask_generator=mask_gen, loader=train_loader, config=_config_dict(cfg),
                                        computed=computed, keep=cfg.run.keep_ckpts, rank=run.rank,
                                        world_size=run.world_size)
    return Training(cfg=cfg, run=run, run_dir=run_dir, lock=lock, view=view, computed=computed,
                    train_loader=train_loader, knn=knn, model=model, operator=build_operator(cfg), mask_gen=mask_gen,
                    optimizer=optimizer, autocast=autocast, checkpointer=checkpointer)


def resume(t: Training, resume_path: Path | None, notes: list[str]) -> Position:
    """Restore weights, queue, optimizer, schedule position and RNG states from `resume_path` (None: a fresh run)."""
    if resume_path is None:
        return Position()
    cfg = t.cfg
    epoch, step, step_in_epoch, loader_state = ckpt_io.resume_from(
        resume_path, method=t.model.method, optimizer=t.optimizer, mask_generator=t.mask_gen, rank=t.run.rank,
        world_size=t.run.world_size, model=f"{cfg.method.name}/{cfg.method.branch} {cfg.method.arch}")
    if epoch >= cfg.run.epochs:
        t.view.message(f"{resume_path} has finished all {cfg.run.epochs} epochs: nothing to train, writing the "
                       "outputs again (raise run.epochs to train on)")
    else:
        t.view.message(f"resumed from {resume_path} at epoch {epoch + 1}, step {step}")
    for note in notes:
        t.view.message(note)
    return Position(epoch, step, step_in_epoch, loader_state)


def start_logging(t: Training, pos: Position) -> None:
    """config.yaml, metrics.jsonl kept up to `pos.step`, the progress view and the signal handlers."""
    cfg, run, computed = t.cfg, t.run, t.computed
    if run.is_main:
        # Records a killed run wrote past its checkpoint are logged again from here: keep one history.
        dropped = drop_records_after(t.run_dir / "metrics.jsonl", pos.step)
        if dropped:
            t.view.message(f"metrics.jsonl: dropped {dropped} records past step {pos.step} (logged after the "
                           "checkpoint; they are logged again from here)")
        (t.run_dir / "config.yaml").write_text(to_yaml(cfg, {"computed": computed, "provenance": provenance()}))
    t.metrics = MetricsWriter(t.run_dir, tensorboard=cfg.run.tensorboard, enabled=run.is_main)
    t.view.close()
    t.view = ProgressView(computed["stop_step"], is_main=run.is_main, show_steps=cfg.run.progress,
                          start_step=pos.step)
    t.view.message(f"run dir {t.run_dir} · {cfg.method.name}/{cfg.method.branch} · {run.world_size} x {run.device} · "
                   f"global batch {computed['global_batch']} · {computed['steps_per_epoch']} steps/epoch · "
                   f"lr {computed['lr']:.4g}")
    t.stop = StopRequest()


def run_epochs(t: Training, pos: Position) -> Outcome:
    """Epochs until run.epochs or run.max_steps, a signal or a non-finite loss; checkpoint after each."""
    cfg, stop = t.cfg, t.stop
    while pos.epoch < cfg.run.epochs and not (cfg.run.max_steps and pos.step >= cfg.run.max_steps):
        outcome = run_epoch(t, pos)
        if outcome is Outcome.NONFINITE:
            return outcome
        if outcome is Outcome.SIGNAL:
            t.checkpointer.save(pos.epoch, pos.step, pos.step_in_epoch, periodic=False)
            t.view.message(f"{stop.signal_name or 'signal'} received: saved {t.checkpointer.last} at step "
                           f"{pos.step}; run again with the same command to resume")
            return outcome
        end_epoch(t, pos)
        if stop.agreed(t.run)[0]:
            t.view.message(f"{stop.signal_name or 'signal'} received: checkpoint saved at step {pos.step}")
            return Outcome.SIGNAL
    return Outcome.DONE


def run_epoch(t: Training, pos: Position) -> Outcome:
    """Train from `pos` to the end of its epoch, or to run.max_steps, a signal or a non-finite loss."""
    cfg, loader = t.cfg, t.train_loader
    # Resuming mid-epoch starts the epoch at the next batch: nothing already trained on is read again.
    loader.set_epoch(pos.epoch, start_batch=pos.step_in_epoch, state=pos.loader_state)
    pos.loader_state = None
    t.model.module.train()
    window = LogWindow()
    batches = iter(loader)
    outcome = Outcome.DONE
    for batch in window.timed(batches):
        lr = t.lr_at(pos.step)
        set_lr(t.optimizer, lr)
        mixed = t.operator(batch.view1, t.mask_gen)
        window.add(train_step(t.model, t.optimizer, batch.view1, batch.view2, mixed, autocast=t.autocast,
                              progress=(pos.step + 1) / t.computed["total_steps"]))
        pos.step += 1
        pos.step_in_epoch += 1
        stopped = log_step(t, pos, window, lr)
        if stopped is not None:
            outcome = stopped
            break
        if cfg.run.max_steps and pos.step >= cfg.run.max_steps:
            break
    close = getattr(batches, "close", None)
    if close is not None:  # an epoch left early (max_steps, signal, non-finite): stop the loader's threads
        close()
    if bad := getattr(loader, "bad_files", None):  # dali / torchvision skip unreadable files
        listed = "; ".join(f"{path} ({why})" for path, why in bad[:20])
        t.view.message(f"epoch {pos.epoch + 1}: skipped {len(bad)} unreadable image(s): {listed}"
                       + (f"; and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return outcome


def log_step(t: Training, pos: Position, window: LogWindow, lr: float) -> Outcome | None:
    """Every run.log_every steps and at the end of an epoch: agree on stopping, log the window's means.

    Returns why to stop now (a signal, a non-finite loss) or None to go on.
    """
    cfg, run, stop = t.cfg, t.run, t.stop
    last_step = pos.step == t.computed["stop_step"] or pos.step_in_epoch == t.computed["steps_per_epoch"]
    if pos.step % cfg.run.log_every == 0 or last_step:
        # Sync point: the only host-device synchronisation in the loop, every log_every steps.
        stop_now, bad = stop.agreed(run, window.nonfinite)
        if bad:
            return Outcome.NONFINITE
        stats = window.stats(t.computed["global_batch"])
        stats.update(lr=lr, epoch=pos.epoch)
        t.metrics.write(stats, step=pos.step)
        t.view.update(pos.step, pos.epoch, cfg.run.epochs, stats)
        window.reset()
        if stop_now:
            return Outcome.SIGNAL
    if not run.distributed and stop.signal_name:  # one process: no peer to agree with, stop at once
        return Outcome.SIGNAL
    return None


def end_epoch(t: Training, pos: Position) -> None:
    """Checkpoint where the epoch stopped (periodic ones every run.ckpt_every epochs) and run the kNN monitor."""
    cfg = t.cfg
    finished = pos.step_in_epoch >= t.computed["steps_per_epoch"]
    if finished:
        pos.epoch += 1
        pos.step_in_epoch = 0
    t.checkpointer.save(pos.epoch, pos.step, pos.step_in_epoch,
                        periodic=finished and pos.epoch % cfg.run.ckpt_every == 0)
    # The next epoch starts at its first batch (an epoch cut by run.max_steps ends the run).
    pos.step_in_epoch = 0
    if finished and t.knn is not None and cfg.run.knn_every and pos.epoch % cfg.run.knn_every == 0:
        acc = knn_monitor(t.model.method.backbone, t.knn, cfg, t.run.device, t.autocast)
        t.metrics.write({"epoch": pos.epoch, "knn_top1": acc}, step=pos.step, prefix="knn")
        t.view.message(f"epoch {pos.epoch}: kNN top-1 {acc:.2f}%")


def finish(t: Training, pos: Position, outcome: Outcome) -> int:
    """Close the logs; after a full run write backbone.pt, the figures and kNN. Returns the exit code."""
    t.view.close()
    if outcome is Outcome.NONFINITE:
        t.metrics.close()
        good = t.checkpointer.last
        msg = f"the loss became non-finite before step {pos.step}; stopping"
        msg += f" (last good checkpoint: {good})" if good.is_file() else " (no checkpoint was written yet)"
        if t.run.is_main:
            print(f"error: {msg}; lower optim.base_lr or check the data", file=sys.stderr)
        return 3
    if outcome is Outcome.DONE:
        write_run_artifacts(t.cfg, t.model.method, t.run_dir, t.knn, t.run.device, t.autocast, log=t.view.message,
                            is_main=t.run.is_main)
    t.metrics.close()
    return 0


def _config_dict(cfg: Config) -> dict:
    from mixmask.run.config_cli import to_dict

    return to_dict(cfg)


if __name__ == "__main__":
    sys.exit(main())
