"""python -m mixmask.reproduce: tables as runs, the SLURM script, tiny end to end through train.py and eval.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixmask.reproduce.__main__ import main
from mixmask.reproduce.collect import collect, load_paper, to_markdown
from mixmask.reproduce.tables import TABLES, config_keys, expand, get_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(repo_root: Path, *argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixmask.reproduce", *argv], cwd=repo_root, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _fails(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _md_rows(md: str) -> dict[str, dict[str, str]]:
    """The first Markdown table of results.md as {row label: {column header: cell text}}."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        if ln.startswith("|---"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == "" or len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


# ---- tables and published numbers


def test_paper_results_name_every_cell_and_a_source_for_every_number():
    paper = load_paper()
    for table in TABLES.values():
        for dataset in table.datasets:
            keys = [c.key for c in table.cells(dataset)]
            entries = paper["tables"][table.name][dataset]
            assert set(entries) == set(keys), (table.name, dataset)
            for key, entry in entries.items():
                if entry is not None:
                    assert isinstance(entry["value"], (int, float)) and 0 < entry["value"] < 100, key
                    assert entry["source"] in paper["sources"], key
    readme = paper["tables"]["imagenet"]["imagenet"]
    assert readme["MixMask*/MoCo v2"] == {"value": 69.5, "source": "official_readme"}


def test_table_cells_expand_into_runs(tmp_path):
    table2 = expand(TABLES["table2"], "cifar100", tmp_path)
    assert len(table2) == 16 and len({r.run_dir for r in table2}) == 16
    assert {r.preset for r in table2} == {f"cifar100-{m}-{b}" for m in ("moco", "simclr", "byol", "simsiam")
                                          for b in ("vanilla", "unmix", "mixmask", "mixmask-unmix")}
    assert all(r.linear and r.run_dir.parent == tmp_path / "table2" / "cifar100" for r in table2)
    # Table 1: the "grid 2" row is the "discrete" row (one run), blocked masks never at grid 2.
    table1 = {r.name: r for r in expand(TABLES["table1"], "cifar100", tmp_path)}
    assert set(table1) == {"block-g4", "discrete-g2", "block-g8"}
    assert table1["discrete-g2"].cells == ["mask type: discrete/MixMask", "grid 2/MixMask"]
    assert table1["discrete-g2"].overrides == ["mask.kind=discrete", "mask.grid_size=2"]
    assert {r.name for r in expand(TABLES["table1"], "tinyimagenet", tmp_path, only=["block-*"])} == {
        "block-g4", "block-g8", "block-g16"}
    tiny = expand(TABLES["imagenet"], "imagenet", tmp_path, tiny=True, extra=["run.seed=3"])
    assert all("data.source=synthetic" in r.overrides and r.overrides[-1] == "run.seed=3" for r in tiny)


def test_permutation_ablation_uses_one_mask_per_batch_with_a_real_config_key(tmp_path):
    runs = expand(TABLES["permutation"], "cifar100", tmp_path)
    assert [r.overrides for r in runs] == [["mask.permutation=reverse", "mask.share=batch"],
                                           ["mask.permutation=random", "mask.share=batch"]]
    assert {o.split("=")[0] for r in runs for o in r.overrides} <= config_keys()


def test_published_numbers_sit_beside_the_measured_ones(tmp_path):
    table, dataset = get_table("imagenet", None)
    runs = expand(table, dataset, tmp_path)  # nothing trained yet: ours pending, the README's numbers shown
    md = to_markdown(table, dataset, collect(table, dataset, runs, load_paper()))
    rows = _md_rows(md)
    assert rows["vanilla"]["paper"] == "67.70" and rows["MixMask"]["paper"] == "69.20"
    assert rows["MixMask*"]["paper"] == "69.50" and rows["MixMask*"]["ours"] == "–"
    assert "official MixMask README" in md


# ---- command line: bad input, dry run, SLURM


def test_bad_input_is_one_line_with_exit_2(repo_root, capsys):
    proc = _cli(repo_root, "table7")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: unknown table 'table7' (did you mean 'table2'?); valid: table1, table2, "
                                   "permutation, imagenet")
    assert "table2 has no 'imagenet' runs" in _fails(capsys, "table2", "--dataset", "imagenet")
    assert "--only zzz matches no run" in _fails(capsys, "table2", "--only", "zzz", "--dry-run")
    assert "pass data.path=" in _fails(capsys, "table2", "--dataset", "cifar100")
    assert "unknown config key 'mask.bogus'" in _fails(capsys, "table1", "--dry-run", "mask.bogus=1")


def test_dry_run_lists_the_runs_and_prints_the_slurm_script(tmp_path, capsys):
    from mixmask.run.config_cli import resolve

    assert main(["table2", "--dataset", "cifar100", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    listing, script = out.split("# ---- SLURM array script", 1)
    names = re.findall(r"^(\S+)  \[to run\]", listing, flags=re.M)
    assert len(names) == 16 and "byol-mixmask-unmix" in names
    assert "preset:    cifar100-simsiam-unmix" in listing
    assert f"train:     {sys.executable} " in listing and f"linear:    {sys.executable} " in listing  # local
    assert "note: 16 runs need data.path=" in listing
    script = script.split("\n", 1)[1]
    for line in ("#!/bin/bash", "#SBATCH --array=0-15", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script
    script_file = tmp_path / "check.sbatch"
    script_file.write_text(script)
    assert subprocess.run(["bash", "-n", str(script_file)]).returncode == 0
    # Each array task's train command is one the trainer accepts, and writes into its own run directory.
    trains = [shlex.split(m) for m in re.findall(r"^    train=\((.*)\)$", script, flags=re.M)]
    assert len(trains) == 16
    out_dirs = set()
    for argv in trains:
        assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"] and argv[5].endswith("train.py")
        preset, overrides = argv[argv.index("--preset") + 1], argv[argv.index("--preset") + 2:]
        cfg = resolve(preset, None, overrides)
        out_dirs.add(cfg.run.out_dir)
        assert Path(cfg.run.out_dir).parent == tmp_path / "table2" / "cifar100"
    assert len(out_dirs) == 16


def test_slurm_writes_the_script_and_says_how_to_submit(tmp_path, capsys):
    argv = ["table1", "--dataset", "tinyimagenet", "--launcher", "slurm", "--out", str(tmp_path),
            "--nproc-per-node", "2", "data.path=/data/tiny-train.beton"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    script = tmp_path / "table1" / "tinyimagenet" / "reproduce.sbatch"
    assert f"sbatch {script}" in out and "--collect" in out
    text = script.read_text()
    assert "#SBATCH --array=0-4" in text and "--gpus-per-node=2 --cpus-per-task=16" in text
    assert "--nproc_per_node=2" in text and "data.path=/data/tiny-train.beton" in text


# ---- end to end on CPU: train.py and eval.py for real, then the comparison


@pytest.mark.slow
def test_tiny_table2_end_to_end_then_finished_runs_are_skipped(repo_root, tmp_path):
    data_dir = repo_root / "data" / "test-cache"  # shared by the tests: the synthetic .beton is made once
    argv = ["table2", "--dataset", "cifar100", "--scale", "tiny", "--only", "moco-mixmask",
            "--out", str(tmp_path), f"data.data_dir={data_dir}"]
    proc = _cli(repo_root, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "table2" / "cifar100"
    runs = {name: out / name for name in ("moco-mixmask",)}  # one run keeps CI short; the layout is the same
    for name, run_dir in runs.items():  # what train.py resolved and wrote
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["preset"] == f"cifar100-{name}" and cfg["method"]["branch"] == name.split("-", 1)[1]
        assert cfg["data"]["source"] == "synthetic" and cfg["run"]["max_steps"] == 2
    md = (out / "results.md").read_text()
    assert "Scale tiny" in md and md in proc.stdout
    rows = _md_rows(md)
    paper = load_paper()["tables"]["table2"]["cifar100"]
    for name, column in (("moco-mixmask", "MixMask"),):
        linear = json.loads((runs[name] / "eval_linear.json").read_text())["results"]["top1"]  # eval.py's record
        assert rows["MoCo"][f"{column} ours"] == f"{linear:.2f}"
        published = paper[f"MoCo/{column}"]
        assert rows["MoCo"][f"{column} paper"] == ("–" if published is None else f"{published['value']:.2f}")
    assert rows["MoCo"]["vanilla ours"] == "–" and rows["SimCLR"]["vanilla ours"] == "–"
    knn_rows = _md_rows(md.split("kNN top-1 (%), ours", 1)[1])
    knn = json.loads((runs["moco-mixmask"] / "final_knn.json").read_text())["knn_top1"]  # train.py's record
    assert knn_rows["MoCo"]["MixMask"] == f"{knn:.2f}"
    cells = {c["key"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["MoCo/MixMask"]["ours_knn"] == knn and cells["BYOL/vanilla"]["ours"] is None
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    for run_dir in runs.values():
        assert "train.py" in (run_dir / "reproduce_train.log").read_text().splitlines()[0]

    stamps = {name: (d / "backbone.pt").stat().st_mtime_ns for name, d in runs.items()}
    again = _cli(repo_root, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier, skipped") == len(runs)
    assert {name: (d / "backbone.pt").stat().st_mtime_ns for name, d in runs.items()} == stamps
    assert (out / "results.md").read_text() == md


@pytest.mark.slow
def test_a_failing_run_is_reported_in_one_line_and_the_table_still_collected(repo_root, tmp_path):
    data_dir = repo_root / "data" / "test-cache"
    proc = _cli(repo_root, "permutation", "--scale", "tiny", "--only", "random", "--out", str(tmp_path),
                f"data.data_dir={data_dir}", "data.batch_size=128",  # more than the 64 tiny training images
                "method.moco.queue_size=128")  # (a queue the batch divides: the run itself must fail)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    log = tmp_path / "permutation" / "cifar100" / "random" / "reproduce_train.log"
    trainer_error = [ln for ln in log.read_text().splitlines() if ln.startswith("error: ")][-1]  # train.py's line
    assert "random: failed in" in proc.stderr and f"train exited 2: {trainer_error} (log: {log})" in proc.stderr
    assert "error: 1 of 1 runs failed (random)" in proc.stderr
    assert not (log.parent / "backbone.pt").exists()
    assert "| random | – |" in (tmp_path / "permutation" / "cifar100" / "results.md").read_text()
