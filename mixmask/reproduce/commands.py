"""Command lines of a run (train.py, then eval.py linear), executed one after another or as a SLURM array script.

Every step is skipped when its result file exists (`backbone.pt` from train.py, `eval_linear.json` from eval.py), so
the same command can be re-invoked until a table is done; an unfinished training resumes from its `last.pt`
(`run.resume=auto`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixmask.reproduce.tables import Run

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass(frozen=True)
class Step:
    name: str  # "train" or "linear"
    argv: list[str]
    done: Path  # the file whose existence means the step is finished


def steps(run: Run, launcher: str, *, nproc_per_node: int = 1, python: str = sys.executable) -> list[Step]:
    """train.py then (for tables that report linear probing) eval.py linear, as argv lists."""
    if launcher == "local":
        prefix = [python]
    else:  # torchrun (also inside the SLURM tasks): the same interpreter's torch.distributed.run
        prefix = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    train = [*prefix, str(REPO / "train.py"), "--preset", run.preset, *run.overrides,
             f"run.out_dir={run.run_dir}", "run.progress=false"]
    out = [Step("train", train, run.train_done)]
    if run.linear:
        out.append(Step("linear", [*prefix, str(REPO / "eval.py"), "linear", "--checkpoint", str(run.run_dir)],
                        run.run_dir / "eval_linear.json"))
    return out


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


@dataclass
class Outcome:
    run: str
    status: str  # "done", "skipped", "failed", "stopped"
    seconds: float = 0.0
    detail: str = ""


def execute(runs: list[Run], launcher: str, *, nproc_per_node: int = 1,
            log: Callable[[str], None] = lambda m: None) -> list[Outcome]:
    """Run every unfinished step of every run as a subprocess, logs in `<run_dir>/reproduce_<step>.log`.

    A failed run is reported and the next one starts; a training stopped by a signal (train.py saves `last.pt` and
    exits 0 without `backbone.pt`) stops the loop, since the next invocation resumes it.
    """
    outcomes = []
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.name}"
        if run.finished:
            log(f"{tag}: finished earlier, skipped")
            outcomes.append(Outcome(run.name, "skipped"))
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        outcome = Outcome(run.name, "done")
        for step in steps(run, launcher, nproc_per_node=nproc_per_node):
            if step.done.is_file():
                continue
            log(f"{tag}: {step.name} ...")
            log_file = run.run_dir / f"reproduce_{step.name}.log"
            with open(log_file, "w") as f:
                f.write(f"$ {shell(step.argv)}\n")
                f.flush()
                rc = subprocess.run(step.argv, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                outcome = Outcome(run.name, "failed", detail=f"{step.name} exited {rc}: {_last_error(log_file)} "
                                                             f"(log: {log_file})")
                break
            if not step.done.is_file():
                outcome = Outcome(run.name, "stopped", detail=f"{step.name} stopped before writing {step.done.name} "
                                                              f"(signal?); run the same command again to resume")
                break
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
        log(f"{tag}: {outcome.status} in {outcome.seconds:.0f} s" + (f": {outcome.detail}" if outcome.detail else ""))
        if outcome.status == "stopped":
            break
    return outcomes


def _last_error(log_file: Path) -> str:
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def slurm_script(runs: list[Run], *, table: str, dataset: str, out_dir: Path, gpus_per_task: int,
                 cpus_per_task: int, python: str = sys.executable) -> str:
    """A SLURM array script, one task per run; resumable (USR1 before the time limit, then requeue).

    `#SBATCH --signal=USR1@120` makes train.py checkpoint and exit; the task then puts itself back in the queue
    (`scontrol requeue`), and the requeued task resumes from `last.pt`. Steps whose result file exists are skipped,
    so submitting the script again only runs what is missing.
    """
    lines = [
        "#!/bin/bash",
        f"# MixMask reproduction: {table} on {dataset}, {len(runs)} runs, one array task each.",
        "# Generated by `python -m mixmask.reproduce`; submit with `sbatch THIS_FILE`, again until every run is done.",
        f"#SBATCH --job-name=mixmask-{table}-{dataset}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node={gpus_per_task} --cpus-per-task={cpus_per_task}",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        f"#SBATCH --output={out_dir}/slurm-%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, run in enumerate(runs):
        train, *rest = steps(run, "torchrun", nproc_per_node=gpus_per_task, python=python)
        lines.append(f"  {i})  # {run.name}")
        lines.append(f"    run={shlex.quote(str(run.run_dir))}")
        lines.append(f"    train=({shell(train.argv)})")
        lines.append(f"    linear=({shell(rest[0].argv) if rest else ''})")
        lines.append("    ;;")
    lines += [
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'mkdir -p "$run"',
        '[ -f "$run/backbone.pt" ] || srun "${train[@]}"',
        'if [ ! -f "$run/backbone.pt" ]; then  # stopped by USR1 before the time limit: resume in a new task',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'if [ "${#linear[@]}" -gt 0 ] && [ ! -f "$run/eval_linear.json" ]; then srun "${linear[@]}"; fi',
    ]
    return "\n".join(lines) + "\n"
