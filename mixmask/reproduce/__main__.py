"""Reproduce a paper table in one command: `python -m mixmask.reproduce TABLE [--dataset D] [--launcher L] ...`.

Expands the table into runs (preset + overrides, one run directory each under OUT/TABLE/DATASET/), runs the
unfinished ones (`local`: one after another; `torchrun`: each on N processes; `slurm`: writes an array script and
prints how to submit it), then writes results.md / results.json / results.png with the published numbers beside
the measured ones. `--dry-run` lists the runs and commands and prints the SLURM script, without running anything.
Trailing `key=value` overrides apply to every run (e.g. data.path=data/cifar100-train.beton).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mixmask.errors import UserError, cli_entry
from mixmask.reproduce.collect import write_results
from mixmask.reproduce.commands import LAUNCHERS, execute, shell, slurm_script, steps
from mixmask.reproduce.tables import TABLES, Run, expand, get_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixmask.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("table", metavar="TABLE", help=f"one of: {', '.join(TABLES)}")
    parser.add_argument("--dataset", default=None, help="dataset of the table (default: its first)")
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and commands and print the SLURM script; run nothing")
    parser.add_argument("--scale", default="paper", choices=("paper", "tiny"),
                        help="tiny: synthetic data and a few CPU steps per run, to exercise the pipeline")
    parser.add_argument("--only", default=None, metavar="PATTERN[,PATTERN]",
                        help="run only the runs whose name matches a glob pattern (e.g. 'moco-*')")
    parser.add_argument("--collect", action="store_true", help="only collect the results of finished runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="output root (default: runs/reproduce, runs/reproduce-tiny at --scale tiny)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes (GPUs) per run for torchrun / slurm (default: torchrun: the visible GPUs, "
                             "at least 1; slurm: 8 on imagenet, else 1)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="slurm: CPUs per task (default 8 per GPU)")
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        raise UserError(f"unrecognized arguments: {' '.join(stray)} (overrides are key=value)")
    args.overrides = extra
    return args


def _check_configs(runs: list[Run], *, need_data: bool) -> list[str]:
    """Resolve every run's config now, so a bad key or value is one line before any run starts.

    Returns the runs that lack a `data.path` they need (an error when `need_data`).
    """
    from mixmask.run.config_cli import resolve

    missing = []
    for run in runs:
        cfg = resolve(run.preset, None, run.overrides)
        if cfg.data.source == "synthetic" or cfg.data.path:
            continue
        missing.append(run.name)
        if need_data:
            raise UserError(f"{run.name} trains on {cfg.data.source}: pass data.path=... (a .beton from "
                            f"`python -m pipelines.convert {cfg.data.source} ...` or the dataset root), or use "
                            "--scale tiny")
    return missing


def _default_nproc(launcher: str, dataset: str) -> int:
    if launcher == "slurm":
        return 8 if dataset == "imagenet" else 1
    if launcher == "torchrun":
        import torch

        return max(1, torch.cuda.device_count())
    return 1


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table, dataset = get_table(args.table, args.dataset)
    tiny = args.scale == "tiny"
    out_root = (args.out or Path("runs/reproduce-tiny" if tiny else "runs/reproduce")).resolve()
    only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
    all_runs = expand(table, dataset, out_root, tiny=tiny, extra=args.overrides)
    runs = expand(table, dataset, out_root, tiny=tiny, extra=args.overrides, only=only)
    out_dir = out_root / table.name / dataset
    nproc = args.nproc_per_node or _default_nproc(args.launcher, dataset)
    if nproc < 1:
        raise UserError(f"--nproc-per-node {nproc} must be >= 1")
    no_data = _check_configs(runs, need_data=not (args.dry_run or args.collect))

    if args.collect:
        return _collect(table, dataset, all_runs, out_dir, tiny)
    if args.dry_run:
        print(f"{table.title} on {dataset}: {len(runs)} runs under {out_dir} ({args.launcher})")
        for run in runs:
            status = "finished" if run.finished else "to run"
            print(f"\n{run.name}  [{status}]  cells: {', '.join(run.cells)}")
            print(f"  preset:    {run.preset}")
            print(f"  overrides: {' '.join(run.overrides) or '-'}")
            launcher = "torchrun" if args.launcher == "slurm" else args.launcher
            for step in steps(run, launcher, nproc_per_node=nproc):
                print(f"  {step.name + ':':10} {shell(step.argv)}")
        if no_data:
            print(f"\nnote: {len(no_data)} runs need data.path=... (the training .beton or dataset root) to run")
        script_nproc = args.nproc_per_node or _default_nproc("slurm", dataset)
        print("\n# ---- SLURM array script that --launcher slurm writes (not written, not submitted: --dry-run)")
        print(_script(runs, table.name, dataset, out_dir, script_nproc, args.cpus_per_task), end="")
        return 0
    if args.launcher == "slurm":
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "reproduce.sbatch"
        path.write_text(_script(runs, table.name, dataset, out_dir, nproc, args.cpus_per_task))
        pending = sum(not r.finished for r in runs)
        print(f"wrote {path} ({len(runs)} array tasks, {pending} not finished yet)")
        print(f"submit with:   sbatch {path}")
        again = [table.name, "--dataset", dataset, *(["--scale", "tiny"] if tiny else []),
                 *(["--out", str(args.out)] if args.out else []), "--collect"]
        print(f"then collect:  python -m mixmask.reproduce {shell(again)}")
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"{table.title} on {dataset}: {len(runs)} runs under {out_dir}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # the run logs stay readable while they are written
    outcomes = execute(runs, args.launcher, nproc_per_node=nproc, log=log)
    rc = _collect(table, dataset, all_runs, out_dir, tiny)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        log(f"error: {len(failed)} of {len(runs)} runs failed ({', '.join(o.run for o in failed)}); "
            "fix and run the same command again (finished runs are skipped)")
        return 1
    return rc


def _script(runs: list[Run], table: str, dataset: str, out_dir: Path, nproc: int, cpus: int | None) -> str:
    return slurm_script(runs, table=table, dataset=dataset, out_dir=out_dir, gpus_per_task=nproc,
                        cpus_per_task=cpus or 8 * nproc)


def _collect(table, dataset: str, runs: list[Run], out_dir: Path, tiny: bool) -> int:
    result = write_results(table, dataset, runs, out_dir, tiny=tiny)
    print((out_dir / "results.md").read_text())
    done = sum(r["ours"] is not None for r in result["records"])
    print(f"{done} of {len(result['records'])} cells measured; wrote {', '.join(result['files'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
