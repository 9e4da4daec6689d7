"""MixMask self-supervised training: `python train.py --preset NAME [--config FILE] [key=value ...]`.

Single process with `python train.py`; data-parallel with `torchrun --nproc_per_node N train.py ...` (env://,
NCCL on GPU, gloo on CPU). Reads top to bottom: config → launch → data → method → optimizer → resume → loop.
Rank 0 alone writes files and draws the progress view; every rank runs the same number of steps.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mixmask.errors import UserError, cli_entry
from mixmask.run import checkpoint as ckpt_io
from mixmask.run import launch, rundir
from mixmask.run.build import (
    build_loaders,
    build_method_from_config,
    build_operator,
    knn_monitor,
    write_run_artifacts,
)
from mixmask.run.config import Config, derived, method_shape
from mixmask.run.config_cli import add_config_arguments, config_from_args, to_yaml
from mixmask.run.metrics import MetricsWriter, drop_records_after
from mixmask.run.optim import build_optimizer, lr_at, set_lr
from mixmask.run.progress import ProgressView
from mixmask.run.provenance import provenance
from pipelines.prepare import prepare_data


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


def train(cfg: Config, run: launch.Launch) -> int:
    torch.manual_seed(cfg.run.seed + run.rank)
    device = run.device
    run_dir = Path(cfg.run.out_dir or f"runs/{cfg.preset or 'custom'}")
    ckpt_dir = run_dir / "checkpoints"
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    view = ProgressView(0, is_main=run.is_main, show_steps=False)
    # One run per directory; a resume must continue the stored run (same model, data and schedule).
    def prepare_run_dir() -> None:  # a folder that cannot be written: one line now, on every rank
        launch.check_writable_dir(run_dir, "run.out_dir")
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    _run_lock = rundir.lock_run_dir(run_dir, pid=os.getpid(), is_main=run.is_main, distributed=run.distributed,
                                    prepare=prepare_run_dir)
    rundir.refuse_fresh_start_over(ckpt_dir, cfg.run.resume)
    resume_path = ckpt_io.find_resume(cfg.run.resume, ckpt_dir)
    resume_notes: list[str] = []
    if resume_path is not None:  # checked before any work; the weights are restored once the method exists
        stored = ckpt_io.load_checkpoint(resume_path, map_location="cpu")["config"]
        resume_notes = rundir.check_resume_config(stored, _config_dict(cfg), checkpoint=resume_path,
                                                  allow_change=cfg.run.allow_config_change)
    if note := launch.worker_note(cfg.data.workers):
        view.message(note)

    # ---- data: the synthetic default is converted on first use (rank 0), then every rank opens its shard
    data = prepare_data(cfg.data, is_main=run.is_main, barrier=launch.barrier, log=view.message)
    comp = derived(cfg, run.world_size)
    train_loader, knn_loaders = build_loaders(cfg, data, run, comp["batch_size_per_rank"], use_bf16)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the training set: no full batch")
    comp = derived(cfg, run.world_size, steps_per_epoch)
    total_steps = comp["total_steps"]
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # ---- method, operator, optimizer
    method = build_method_from_config(cfg, world_size=run.world_size).to(device)
    if note := cfg.method.params.launch_note(method_shape(cfg, run.world_size)):
        view.message(note)
    if cfg.method.sync_bn and run.distributed:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if cfg.run.channels_last:
        method = method.to(memory_format=torch.channels_last)
    operator = build_operator(cfg)
    mask_gen = torch.Generator(device=device)
    mask_gen.manual_seed(cfg.run.seed * 1000 + run.rank)
    optimizer = build_optimizer(cfg.optim.name, method, lr=comp["lr"], weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum, decay_norm_and_bias=cfg.optim.decay_norm_and_bias)

    # ---- resume (weights, queue, optimizer, schedule position, RNG states)
    epoch, step, skip_batches, loader_state = 0, 0, 0, None
    if resume_path is not None:
        epoch, step, skip_batches, loader_state = ckpt_io.resume_from(
            resume_path, method=method, optimizer=optimizer, mask_generator=mask_gen, rank=run.rank,
            world_size=run.world_size, model=f"{cfg.method.name}/{cfg.method.branch} {cfg.method.arch}")
        if epoch >= cfg.run.epochs:
            view.message(f"{resume_path} has finished all {cfg.run.epochs} epochs: nothing to train, writing the "
                         "outputs again (raise run.epochs to train on)")
        else:
            view.message(f"resumed from {resume_path} at epoch {epoch + 1}, step {step}")
        for note in resume_notes:
            view.message(note)
    if run.is_main:
        # Records a killed run wrote past its checkpoint are logged again from here: keep one history.
        dropped = drop_records_after(run_dir / "metrics.jsonl", step)
        if dropped:
            view.message(f"metrics.jsonl: dropped {dropped} records past step {step} (logged after the checkpoint; "
                         "they are logged again from here)")
        (run_dir / "config.yaml").write_text(to_yaml(cfg, {"computed": comp, "provenance": provenance()}))

    # ---- compile before DDP (nanoGPT order); keep `method` as the plain module that gets saved
    model: torch.nn.Module = method
    if cfg.run.compile:
        model = torch.compile(model)
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    metrics = MetricsWriter(run_dir, tensorboard=cfg.run.tensorboard, enabled=run.is_main)
    view.close()
    view = ProgressView(comp["stop_step"], is_main=run.is_main, show_steps=cfg.run.progress, start_step=step)
    view.message(f"run dir {run_dir} · {cfg.method.name}/{cfg.method.branch} · {run.world_size} x {device} · "
                 f"global batch {comp['global_batch']} · {steps_per_epoch} steps/epoch · lr {comp['lr']:.4g}")
    stop = StopRequest()

    def save(tag_epoch: int, step_in_epoch: int, *, periodic: bool) -> None:
        mine = (ckpt_io.rng_state(mask_gen), train_loader.position_state() if step_in_epoch else None)
        gathered: list = [mine]
        if run.distributed:  # every rank's RNG and loader position, so a resumed rank continues its own streams
            gathered = [None] * run.world_size
            torch.distributed.all_gather_object(gathered, mine)
        if not run.is_main:
            return
        state = {"version": ckpt_io.CHECKPOINT_VERSION, "method": method.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": None, "epoch": tag_epoch, "step": step,
                 "step_in_epoch": step_in_epoch, "rng": [g[0] for g in gathered],
                 "loader": [g[1] for g in gathered], "config": _config_dict(cfg), "computed": comp,
                 "provenance": provenance()}
        ckpt_io.save_atomic(state, ckpt_dir / "last.pt")
        if periodic:
            ckpt_io.save_atomic(state, ckpt_dir / f"epoch_{tag_epoch:04d}.pt")
            ckpt_io.prune_periodic(ckpt_dir, cfg.run.keep_ckpts)

    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    exit_code, reason = 0, "done"
    while epoch < cfg.run.epochs and (not cfg.run.max_steps or step < cfg.run.max_steps):
        # Resuming mid-epoch starts the epoch at the next batch: nothing already trained on is read again.
        train_loader.set_epoch(epoch, start_batch=skip_batches, state=loader_state)
        model.train()
        window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
        sums: dict[str, torch.Tensor] = {}
        batches = iter(train_loader)
        step_in_epoch = skip_batches
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - t_wait
            if batch is None:
                break
            lr = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=comp["lr"],
                       schedule=cfg.optim.schedule, milestones=cfg.optim.milestones)
            set_lr(optimizer, lr)
            mixed = operator(batch.view1, mask_gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                terms = model(batch.view1, batch.view2, mixed)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            step += 1
            step_in_epoch += 1
            method.after_step(step / total_steps)
            nonfinite |= ~torch.isfinite(terms["loss"].detach())
            for k, v in terms.items():  # accumulate on the device: no sync until the log step
                sums[k] = sums.get(k, 0) + v.detach().float()
            window["steps"] += 1

            last_step = step == comp["stop_step"] or step_in_epoch == steps_per_epoch
            if step % cfg.run.log_every == 0 or last_step:
                # Sync point: the only host-device synchronisation in the loop, every log_every steps.
                stop_now, bad = stop.agreed(run, nonfinite)
                if bad:
                    exit_code, reason = 3, "nonfinite"
                    break
                elapsed = time.perf_counter() - window["t0"]
                stats = {k: (v / window["steps"]).item() for k, v in sums.items()}
                stats.update(lr=lr, epoch=epoch, images_per_s=window["steps"] * comp["global_batch"] / elapsed,
                             data_wait=window["wait"] / elapsed)
                metrics.write(stats, step=step)
                view.update(step, epoch, cfg.run.epochs, stats)
                window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
                sums = {}
                if stop_now:
                    reason = "signal"
                    break
            if not run.distributed and stop.signal_name:
                reason = "signal"
                break
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                break
        close = getattr(batches, "close", None)
        if close is not None:  # an epoch left early (max_steps, signal, non-finite): stop the loader's threads
            close()
        if bad := getattr(train_loader, "bad_files", None):  # dali / torchvision skip unreadable files
            listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:20])
            view.message(f"epoch {epoch + 1}: skipped {len(bad)} unreadable image(s): {listed}"
                         + (f"; and {len(bad) - 20} more" if len(bad) > 20 else ""))
        skip_batches, loader_state = 0, None
        if reason == "nonfinite":
            break
        if reason == "signal":
            save(epoch, step_in_epoch, periodic=False)
            view.message(f"{stop.signal_name or 'signal'} received: saved {ckpt_dir / 'last.pt'} at step {step}; "
                         "run again with the same command to resume")
            exit_code = 0
            break
        finished_epoch = step_in_epoch >= steps_per_epoch
        if finished_epoch:
            epoch += 1
        save(epoch, 0 if finished_epoch else step_in_epoch,
             periodic=finished_epoch and epoch % cfg.run.ckpt_every == 0)
        if finished_epoch and knn_loaders is not None and cfg.run.knn_every and epoch % cfg.run.knn_every == 0:
            acc = knn_monitor(method.backbone, knn_loaders, cfg, device, use_bf16)
            metrics.write({"epoch": epoch, "knn_top1": acc}, step=step, prefix="knn")
            view.message(f"epoch {epoch}: kNN top-1 {acc:.2f}%")
        if stop.agreed(run)[0]:
            reason = "signal"
            view.message(f"{stop.signal_name or 'signal'} received: checkpoint saved at step {step}")
            break

    view.close()
    if reason == "nonfinite":
        metrics.close()
        good = ckpt_dir / "last.pt"
        msg = f"the loss became non-finite before step {step}; stopping"
        msg += f" (last good checkpoint: {good})" if good.is_file() else " (no checkpoint was written yet)"
        if run.is_main:
            print(f"error: {msg}; lower optim.base_lr or check the data", file=sys.stderr)
        return exit_code
    if reason == "done":
        write_run_artifacts(cfg, method, run_dir, knn_loaders, device, use_bf16, log=view.message,
                            is_main=run.is_main)
    metrics.close()
    return exit_code


def _config_dict(cfg: Config) -> dict:
    from mixmask.run.config_cli import to_dict

    return to_dict(cfg)


if __name__ == "__main__":
    sys.exit(main())
