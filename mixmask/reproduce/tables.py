"""The paper's tables as runs: each cell of a table is one training run, a preset plus `key=value` overrides.

A table names its cells by row and column (`MoCo/MixMask`, `mask type: blocked/MixMask`); the published numbers in
`mixmask/reproduce/paper_results.yaml` use the same names. Cells that need the same configuration share one run
(Table 1's "grid 2" row is its "discrete" row). Overrides are written against config keys by name, so a preset that
changes (grid, mask kind, heads) changes the runs without a change here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from mixmask.errors import UserError, did_you_mean

# The paper's one mask per batch (the paper presets' own setting; stated so the row does not depend on it).
ONE_MASK_PER_BATCH = "mask.share=batch"

# `--scale tiny`: synthetic data, a few CPU steps per run, so the whole pipeline (train, kNN, linear probe,
# collection) runs in seconds. run.knn_every > 0 makes train.py write final_knn.json; max_steps ends the run before
# the first epoch ends, so the monitor itself never runs.
TINY_OVERRIDES = (
    "data.source=synthetic", "data.resolution=32", "data.synthetic_images=64",
    "data.synthetic_val_images=32", "data.synthetic_classes=4", "data.batch_size=16", "data.workers=1",
    "method.arch=resnet18", "method.moco.queue_size=64", "run.max_steps=2", "run.device=cpu", "run.knn_every=1",
    "run.tensorboard=false", "run.log_every=1", "eval.epochs=2", "eval.batch_size=32", "eval.knn_k=10",
)

METHOD_LABELS = {"moco": "MoCo", "simclr": "SimCLR", "byol": "BYOL", "simsiam": "SimSiam"}
BRANCH_LABELS = {"vanilla": "vanilla", "unmix": "Un-Mix", "mixmask": "MixMask", "mixmask-unmix": "MixMask*"}


@dataclass(frozen=True)
class Cell:
    """One number of a table: where it sits (row, column) and the run that measures it."""

    row: str
    column: str
    run: str  # run name (a folder name); cells with the same configuration share it
    preset: str
    overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.row}/{self.column}"


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    datasets: tuple[str, ...]
    metric: str  # the protocol the paper reports: "linear" (eval.py linear) or "knn"
    cells: Callable[[str], list[Cell]]  # dataset -> cells, in row-major order
    note: str = ""

    def rows(self, dataset: str) -> list[str]:
        return list(dict.fromkeys(c.row for c in self.cells(dataset)))

    def columns(self, dataset: str) -> list[str]:
        return list(dict.fromkeys(c.column for c in self.cells(dataset)))


@dataclass
class Run:
    """A training run (plus its evaluation) under `<out_root>/<table>/<dataset>/<name>`."""

    name: str
    preset: str
    overrides: list[str]
    run_dir: Path
    linear: bool  # the table reports linear probing: eval.py linear follows training
    cells: list[str] = field(default_factory=list)

    @property
    def train_done(self) -> Path:
        return self.run_dir / "backbone.pt"  # written by train.py only when training finished

    @property
    def result_files(self) -> list[Path]:
        return [self.train_done] + ([self.run_dir / "eval_linear.json"] if self.linear else [])

    @property
    def finished(self) -> bool:
        return all(p.is_file() for p in self.result_files)


# ---- the tables


def _table1(dataset: str) -> list[Cell]:
    """Table 1: mask type and grid size, MoCo + MixMask (the caption's MoCo V1 head comes from the preset).

    The rows follow the project's issue 12 and DESIGN.md; the paper's own Table 1 (which grids, which datasets) could
    not be read when this was written (see `mixmask/reproduce/paper_results.yaml`), so its row set is still to be
    checked.
    """
    preset = f"{dataset}-moco-mixmask"
    # BEiT blocks need >= 4 cells and a strict fit, so they cannot fill a 2x2 grid: the blocked row runs at the
    # smallest grid they can fill (4); discrete masks run at the paper's best small-image grid (2 at 32 px).
    kind_grid = {"block": 4, "discrete": 2 if dataset == "cifar100" else 4}
    grids = {"cifar100": (2, 4, 8), "tinyimagenet": (2, 4, 8, 16)}[dataset]

    def cell(row: str, kind: str, grid: int) -> Cell:
        return Cell(row, "MixMask", f"{kind}-g{grid}", preset, (f"mask.kind={kind}", f"mask.grid_size={grid}"))

    cells = [cell("mask type: blocked", "block", kind_grid["block"]),
             cell("mask type: discrete", "discrete", kind_grid["discrete"])]
    cells += [cell(f"grid {g}", "discrete" if g == 2 else "block", g) for g in grids]
    return cells


def _table2(dataset: str) -> list[Cell]:
    """Table 2: every framework with each branch (vanilla, Un-Mix, MixMask, MixMask* = both)."""
    return [Cell(METHOD_LABELS[m], BRANCH_LABELS[b], f"{m}-{b}", f"{dataset}-{m}-{b}")
            for m in METHOD_LABELS for b in BRANCH_LABELS]


def _permutation(dataset: str) -> list[Cell]:
    """Permutation ablation: the partner of sample i is n-1-i (reverse, official) or random; one mask per batch.

    Its rows (and that it runs on both small datasets) are the project's reading, not yet checked against the paper.
    """
    return [Cell(label, "MixMask", perm, f"{dataset}-moco-mixmask", (f"mask.permutation={perm}", ONE_MASK_PER_BATCH))
            for perm, label in (("reverse", "reverse"), ("random", "random"))]


def _imagenet(dataset: str) -> list[Cell]:
    """MoCo v2 on ImageNet-1K, 200 epochs: the official README's results table."""
    return [Cell(BRANCH_LABELS[b], "MoCo v2", f"moco-{b}", f"{dataset}-moco-{b}")
            for b in ("vanilla", "mixmask", "mixmask-unmix")]


TABLES: dict[str, Table] = {t.name: t for t in (
    Table("table1", "Table 1: mask type and grid size (MoCo + MixMask)", ("cifar100", "tinyimagenet"), "linear",
          _table1, note="Blocked masks run at grid 4: BEiT blocks (>= 4 cells, strict fit) cannot fill a 2x2 grid. "
               "Rows as the project's issue 12 describes Table 1, not yet checked against the paper."),
    Table("table2", "Table 2: frameworks x branches", ("cifar100", "tinyimagenet"), "linear", _table2,
          note="MixMask* = MixMask + Un-Mix (method.branch=mixmask-unmix)."),
    Table("permutation", "Permutation ablation (MoCo + MixMask, one mask per batch)", ("cifar100", "tinyimagenet"),
          "linear", _permutation),
    Table("imagenet", "ImageNet-1K, 200 epochs (official README results)", ("imagenet",), "linear", _imagenet),
)}


def get_table(name: str, dataset: str | None) -> tuple[Table, str]:
    """The named table and dataset (default: the table's first); UserError naming the valid choices."""
    if name not in TABLES:
        raise UserError(f"unknown table {name!r}{did_you_mean(name, TABLES)}; valid: {', '.join(TABLES)}")
    table = TABLES[name]
    dataset = dataset or table.datasets[0]
    if dataset not in table.datasets:
        raise UserError(f"{name} has no {dataset!r} runs{did_you_mean(dataset, table.datasets)}; "
                        f"datasets of {name}: {', '.join(table.datasets)}")
    return table, dataset


def config_keys() -> set[str]:
    """Every dotted key of this version's config (`mask.grid_size`, ...)."""
    from mixmask.run.config import Config

    cfg = Config()
    return {f"{s.name}.{f.name}" for s in fields(cfg) if is_dataclass(getattr(cfg, s.name))
            for f in fields(getattr(cfg, s.name))}


def expand(table: Table, dataset: str, out_root: Path, *, tiny: bool = False, extra: list[str] | tuple = (),
           only: list[str] | None = None) -> list[Run]:
    """The runs of `table` on `dataset`: preset + the cell's overrides (+ tiny scale) + the user's `extra`.

    `only` keeps the runs whose name matches one of the glob patterns.
    """
    from fnmatch import fnmatch

    runs: dict[str, Run] = {}
    for cell in table.cells(dataset):
        overrides = [*cell.overrides, *(TINY_OVERRIDES if tiny else ()), *extra]
        run = runs.get(cell.run)
        if run is None:
            run = runs[cell.run] = Run(cell.run, cell.preset, overrides, out_root / table.name / dataset / cell.run,
                                       linear=table.metric == "linear")
        elif (run.preset, run.overrides) != (cell.preset, overrides):
            raise AssertionError(f"cells sharing run {cell.run} differ in configuration")
        run.cells.append(cell.key)
    selected = list(runs.values())
    if only:
        selected = [r for r in selected if any(fnmatch(r.name, p) for p in only)]
        if not selected:
            raise UserError(f"--only {','.join(only)} matches no run of {table.name} on {dataset}; runs: "
                            f"{', '.join(runs)}")
    return selected
