"""Webdataset shards: the converter's writer, DALI's reader and the webdataset-package reference reader, training.

Shards are written by the real converter, index files are checked against DALI's own `wds2idx`, and both readers
are compared sample for sample; damaged shards are made by cutting real shards.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixmask.errors import UserError
from pipelines.convert import convert
from pipelines.loaders import build_eval_loader, build_two_view_loader
from pipelines.loaders.wds_shards import open_shards
from pipelines.sources import open_source
from tests.loader_fixtures import GEOMETRY_ONLY, check_batch_contract, write_gradient_folder

N, PER_SHARD, BATCH, RES = 42, 10, 3, 32  # 5 shards (10, 10, 10, 10, 2); 2 ranks x 7 steps x 3 = 42
READERS = ("dali", "torchvision")


def _convert(out: Path, num_images: int = N, **kw):
    return convert("synthetic", out, num_images=num_images, num_classes=3, resolution=RES, out_format="wds",
                   shard_samples=PER_SHARD, workers=kw.pop("workers", 2), **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "synthetic"
    _convert(out)
    return out


def _tar_members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as f:
        return [(m.name, f.extractfile(m).read()) for m in f.getmembers()]


def _loader(backend: str, path, *, rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 1,
            batch: int = BATCH, buffer: int = 16, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), drop_last: bool = True):
    return build_two_view_loader(backend, source="synthetic", path=str(path), resolution=RES,
                                 batch_size_per_rank=batch, recipe=recipe, rank=rank, world_size=world_size,
                                 seed=seed, workers=workers, device=torch.device("cpu"), shuffle_buffer=buffer,
                                 drop_last=drop_last)


def _epoch(loader, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, labels, batches) of one epoch."""
    loader.set_epoch(epoch)
    batches = list(loader)
    return (torch.cat([b.index for b in batches]).numpy(), torch.cat([b.labels for b in batches]).numpy(),
            len(batches))


# ---------------------------------------------------------------- writer
def test_shards_hold_every_sample_once_shuffled_pixel_exact_with_dalis_index(shards):
    sidecar = open_shards(shards)
    assert [Path(u).name for u in sidecar.urls] == [f"train-{k:06d}.tar" for k in range(5)]
    assert sidecar.counts().tolist() == [10, 10, 10, 10, 2] and sidecar.num_missing == 0
    rows = np.concatenate(sidecar.rows)
    assert sorted(rows.tolist()) == list(range(N))
    assert not np.array_equal(rows[:PER_SHARD], np.sort(rows[:PER_SHARD]))  # shuffled across shards at write time
    images, labels = open_source("synthetic", None, "train", num_images=N, num_classes=3, resolution=RES).arrays()
    for name, data in _tar_members(shards / "train-000000.tar"):
        key, ext = name.split(".", 1)
        if ext == "png":  # raw mode: lossless
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), images[int(key)])
        else:
            assert ext == "cls" and int(data) == labels[int(key)]
    for k in range(5):  # DALI's own indexer reads the tar to the same index the converter wrote
        tar = shards / f"train-{k:06d}.tar"
        subprocess.run([str(Path(sys.executable).with_name("wds2idx")), str(tar), str(tar) + ".ref"], check=True,
                       capture_output=True)
        assert (Path(str(tar) + ".ref")).read_text() == tar.with_suffix(".idx").read_text()
        os.remove(str(tar) + ".ref")
    side = __import__("json").loads((shards / "train.json").read_text())
    assert side["num_written"] == N and side["class_counts"] == [14, 14, 14] and side["class_names"]
    assert [s["num_samples"] for s in side["shards"]] == [10, 10, 10, 10, 2]


def test_rerun_after_interruption_keeps_finished_shards_and_writes_the_rest(tmp_path):
    out = tmp_path / "shards"
    _convert(out)
    reference = {p.name: p.read_bytes() for p in out.glob("train-*")}
    kept = out / "train-000000.tar"
    kept_stat = kept.stat()
    for k in (1, 3):  # as a kill leaves it: two shards never renamed into place, a temp file, no sidecar
        (out / f"train-{k:06d}.tar").unlink()
        (out / f"train-{k:06d}.idx").unlink()
    (out / "train.json").unlink()
    (out / ".train-000001.tar.tmp-99999").write_bytes(b"half a shard")
    _convert(out)
    assert kept.stat().st_ino == kept_stat.st_ino and kept.stat().st_mtime_ns == kept_stat.st_mtime_ns
    assert {p.name: p.read_bytes() for p in out.glob("train-*")} == reference  # same samples, same shards
    assert not list(out.glob(".*tmp*")) and (out / "train.json").is_file()


@pytest.mark.slow
def test_a_killed_conversion_leaves_only_complete_shards_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "pipelines.convert", "synthetic", "--format", "wds", "--num-images", "2000",
           "--resolution", "32", "--shard-samples", "50", "--workers", "1", "--no-progress"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("train-*.tar"))) < 5:
        assert proc.poll() is None and time.time() < deadline, "conversion ended before it could be killed"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no clean-up of any kind
    proc.wait()
    finished = sorted((tmp_path / "killed").glob("train-*.tar"))
    assert 5 <= len(finished) < 40 and not (tmp_path / "killed" / "train.json").exists()
    for tar in finished:  # every shard under its final name is whole, with its index
        assert len(_tar_members(tar)) == 2 * 50
        assert tar.with_suffix(".idx").read_text().startswith("v1.2 50\n")
    kept = {t.name: t.stat().st_ino for t in finished}
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], cwd=root, check=True, capture_output=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "fresh")], cwd=root, check=True, capture_output=True)
    assert all((tmp_path / "killed" / name).stat().st_ino == ino for name, ino in kept.items())
    for fresh in sorted((tmp_path / "fresh").glob("train-*")):
        assert (tmp_path / "killed" / fresh.name).read_bytes() == fresh.read_bytes()
    assert len(list((tmp_path / "killed").glob("train-*.tar"))) == 40


def test_rerun_with_other_options_is_refused_in_one_line(tmp_path):
    _convert(tmp_path / "shards")
    proc = subprocess.run([sys.executable, "-m", "pipelines.convert", "synthetic", "--format", "wds", "--out",
                           str(tmp_path / "shards"), "--num-images", str(N), "--num-classes", "3", "--resolution",
                           str(RES), "--shard-samples", "20", "--no-progress"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "samples_per_shard" in proc.stderr


def test_imagefolder_jpegs_pass_through_and_bad_files_are_listed(tmp_path):
    write_gradient_folder(tmp_path / "photos")
    (tmp_path / "photos" / "train" / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    summary = convert("imagefolder", tmp_path / "shards" / "photos-%06d.tar", root=tmp_path / "photos",
                      write_mode="jpg", out_format="wds", shard_samples=16, workers=2)
    assert summary.num_written == 42 and summary.num_skipped == 1 and summary.sidecar.name == "photos.json"
    side = __import__("json").loads(summary.sidecar.read_text())
    assert side["skipped"][0]["path"].endswith("broken.jpg") and len(side["shards"]) == 3
    src = open_source("imagefolder", tmp_path / "photos", "train")
    good = [i for i in range(len(src)) if not src.path(i).endswith("broken.jpg")]
    for name, data in _tar_members(tmp_path / "shards" / "photos-000000.tar"):
        if name.endswith(".jpg"):  # the file's own bytes: no second JPEG generation
            assert data == Path(src.path(good[int(name.split(".")[0])])).read_bytes()


# ---------------------------------------------------------------- readers
def test_batch_contract_on_both_readers(tmp_path):
    write_gradient_folder(tmp_path / "photos")
    convert("imagefolder", tmp_path / "shards", root=tmp_path / "photos", write_mode="jpg", out_format="wds",
            shard_samples=16, workers=1)
    for backend in READERS:
        check_batch_contract(_loader(backend, tmp_path / "shards"), BATCH, RES, 42)


@pytest.mark.parametrize("backend", READERS)
def test_two_ranks_are_disjoint_cover_the_epoch_and_take_equal_steps(shards, backend):
    loaders = [_loader(backend, shards, rank=r, world_size=2) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 7
    shares = []
    for epoch in (0, 1):
        (r0, l0, n0), (r1, l1, n1) = (_epoch(loader, epoch) for loader in loaders)
        assert n0 == n1 == 7
        assert not set(r0) & set(r1) and sorted([*r0, *r1]) == list(range(N))
        np.testing.assert_array_equal(l0, r0 % 3)  # synthetic label = index mod classes
        shares.append(set(r0))
    assert shares[0] != shares[1]  # the epoch's shard order moves samples between ranks


# 42 over 2 ranks: 7 full batches each; 41 over 3 ranks: shares of 13, 14, 14 padded to 5 batches (no drop_last,
# which would drop a buffer-order-dependent remainder that the two readers need not agree on)
@pytest.mark.parametrize("num_images,world_size", [(N, 2), (41, 3)])
def test_dali_and_the_reference_reader_read_the_same_samples_per_rank(tmp_path, num_images, world_size):
    _convert(tmp_path / "shards", num_images=num_images)
    for rank in range(world_size):
        dali, ref = (_loader(b, tmp_path / "shards", rank=rank, world_size=world_size, workers=2,
                             drop_last=world_size == 2) for b in READERS)
        for epoch in (0, 3):
            (rd, ld, _), (rr, lr, _) = _epoch(dali, epoch), _epoch(ref, epoch)
            assert set(rd.tolist()) == set(rr.tolist())  # (DALI fills its last batch by padding)
            assert dict(zip(rd.tolist(), ld.tolist())) == dict(zip(rr.tolist(), lr.tolist()))
            assert not np.array_equal(rd, np.sort(rd))  # the buffer shuffles


def test_partition_helpers_against_a_direct_count():
    from pipelines.loaders.wds_reference import batch_workers, worker_runs
    from pipelines.loaders.wds_shards import rank_span
    from pipelines.wds import assign_to_shards

    for n, w in [(21, 4), (41, 3), (7, 8), (100, 1)]:
        spans = [rank_span(n, r, w) for r in range(w)]
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) - min(sizes) <= 1
    assert [hi - lo for lo, hi in (rank_span(21, r, 4) for r in range(4))] == [5, 5, 5, 6]  # DALI: 0,5,10,15,21
    runs = worker_runs(21, 3, 2)  # 7 batches over 2 workers: 4 + 3 whole batches
    assert runs == [(0, 12), (12, 21)]
    assert batch_workers(runs, 3) == [0, 1, 0, 1, 0, 1, 0]  # the DataLoader's round robin
    assert batch_workers(worker_runs(11, 3, 3), 3) == [0, 1, 0, 1]  # 2 + 2 batches (one partial), one idle worker
    parts = assign_to_shards(25, 10, seed=1)
    assert [len(p) for p in parts] == [10, 10, 5] and sorted(np.concatenate(parts).tolist()) == list(range(25))
    assert all(np.array_equal(a, b) for a, b in zip(parts, assign_to_shards(25, 10, seed=1)))
    assert not np.array_equal(np.concatenate(parts), np.concatenate(assign_to_shards(25, 10, seed=2)))


def test_bad_out_for_shards_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.convert", "synthetic", "--format", "wds", "--out",
                           str(tmp_path / "x.beton"), "--no-progress"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is a folder" in proc.stderr


@pytest.mark.parametrize("backend", READERS)
def test_uneven_split_is_padded_to_equal_steps(tmp_path, backend):
    _convert(tmp_path / "odd", num_images=41)  # ranks hold 20 and 21 samples
    loaders = [_loader(backend, tmp_path / "odd", rank=r, world_size=2) for r in (0, 1)]
    rows = [_epoch(loader, 0)[0] for loader in loaders]
    assert [len(r) for r in rows] == [21, 21]
    assert sorted(set(rows[0]) | set(rows[1])) == list(range(41)) and not set(rows[0]) & set(rows[1])
    # eval loaders: stored order, one pass, ceil(N / W) per rank
    evals = [build_eval_loader(backend, source="synthetic", path=str(tmp_path / "odd"), split="train",
                               resolution=RES, batch_size_per_rank=8, train_aug=False, rank=r, world_size=2,
                               workers=1, device=torch.device("cpu"), dtype=torch.float32, channels_last=True)
             for r in (0, 1)]
    assert [sum(len(y) for _, y in e) for e in evals] == [21, 21]


def _damage(src: Path, dst: Path) -> dict[str, set[int]]:
    """Copy the shards and damage them as storage does; returns the rows lost, and the row whose image is bad."""
    shutil.copytree(src, dst)
    lost = set()
    # shard 1: a sample lost its image member (tar rewritten, index remade by DALI's wds2idx)
    members = _tar_members(dst / "train-000001.tar")
    victim = members[0][0].split(".")[0]
    with tarfile.open(dst / "train-000001.tar", "w", format=tarfile.USTAR_FORMAT) as f:
        for name, data in members:
            if name != f"{victim}.png":
                info = tarfile.TarInfo(name)
                info.size = len(data)
                f.addfile(info, io.BytesIO(data))
    subprocess.run([str(Path(sys.executable).with_name("wds2idx")), str(dst / "train-000001.tar"),
                    str(dst / "train-000001.idx")], check=True, capture_output=True)
    lost.add(int(victim))
    # shard 2: truncated in the middle of its last samples (its index still lists them)
    tar = dst / "train-000002.tar"
    lines = tar.with_suffix(".idx").read_text().splitlines()[1:]
    cut = int(lines[-3].split()[1])  # start of the third-last sample's image
    with open(tar, "r+b") as f:
        f.truncate(cut + 10)
    lost.update(int(line.split()[3].split(".")[0]) for line in lines[-3:])
    # shard 3: gone
    lost.update(int(line.split()[3].split(".")[0])
                for line in (dst / "train-000003.idx").read_text().splitlines()[1:])
    (dst / "train-000003.tar").unlink()
    # shard 0: one image's bytes overwritten with zeros (same size: the index stays right)
    line = (dst / "train-000000.idx").read_text().splitlines()[5].split()
    with open(dst / "train-000000.tar", "r+b") as f:
        f.seek(int(line[1]))
        f.write(b"\0" * int(line[2]))
    return {"lost": lost, "bad": {int(line[3].split(".")[0])}}


@pytest.mark.parametrize("backend", READERS)
def test_missing_and_corrupt_members_are_skipped_and_counted(shards, tmp_path, backend):
    damage = _damage(shards, tmp_path / "damaged")
    loader = _loader(backend, tmp_path / "damaged", batch=2)
    assert loader.num_missing == len(damage["lost"]) == 1 + 3 + 10
    complete = N - len(damage["lost"])
    assert len(loader) == complete // 2
    rows, labels, batches = _epoch(loader, 0)
    assert batches == len(loader)  # the step count holds whatever was skipped
    assert not set(rows) & damage["lost"] and not set(rows) & damage["bad"]
    np.testing.assert_array_equal(labels, rows % 3)
    if backend == "dali":
        assert loader.skipped_batches == 1  # DALI drops the whole batch of the image it cannot decode
    else:
        assert set(rows) == set(range(N)) - damage["lost"] - damage["bad"]
        assert loader.skipped_samples == 1  # the one image that does not decode


@pytest.mark.parametrize("backend", READERS)
def test_resume_past_damaged_members_yields_the_uninterrupted_batches(shards, tmp_path, backend):
    """Resumed from `position_state()` after the image that does not decode (DALI drops its batch, the reference
    reader its sample): the recorded position accounts for it, so the rest is the uninterrupted epoch's."""
    from tests.test_resume_no_replay import _assert_same, _batches

    damaged = tmp_path / "damaged"
    _damage(shards, damaged)
    straight = _loader(backend, damaged, batch=2, workers=2)
    straight.set_epoch(2)
    full = _batches(straight)
    start = 8
    interrupted = _loader(backend, damaged, batch=2, workers=2)
    interrupted.set_epoch(2)
    _batches(interrupted, stop=start)
    # the damage lies before the resume point
    assert (interrupted.skipped_batches if backend == "dali" else interrupted.skipped_samples) == 1
    resumed = _loader(backend, damaged, batch=2, workers=2)
    resumed.set_epoch(2, start_batch=start, state=interrupted.position_state())
    _assert_same(_batches(resumed), full[start:])


def test_shard_errors_are_one_line(shards, tmp_path):
    with pytest.raises(UserError, match="holds webdataset shards"):
        build_two_view_loader("ffcv", source="synthetic", path=str(shards), resolution=RES, batch_size_per_rank=2,
                              recipe="mocov2", rank=0, world_size=1, seed=0, workers=1, device="cpu")
    with pytest.raises(UserError, match="no val shards"):
        open_shards(shards, "val")
    with pytest.raises(UserError, match="no shard sidecar"):
        shutil.copy(shards / "train-000000.tar", tmp_path / "x-000000.tar")
        open_shards(str(tmp_path / "x-{000000..000001}.tar"))


def test_brace_pattern_selects_shards(shards):
    subset = open_shards(str(shards / "train-{000000..000002}.tar"))
    assert len(subset) == 30 and subset.num_missing == 0


# ---------------------------------------------------------------- training from shards
SMALL_RUN = ["data.resolution=16", "data.batch_size=16", "data.workers=1", "method.cifar_stem=false",
             "method.moco.queue_size=32", "eval.knn_k=5", "run.progress=false", "run.tensorboard=false",
             "run.max_steps=3", "data.shuffle_buffer=32"]


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "shards"
    for split, n in (("train", 96), ("val", 48)):
        convert("synthetic", out, split=split, num_images=n, num_classes=4, resolution=16, out_format="wds",
                shard_samples=32, workers=1)
    return out


def _train(repo_root: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "train.py", "--preset", "demo", *SMALL_RUN, *args]
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("backend", READERS)
def test_demo_trains_from_shards(repo_root, demo_shards, tmp_path, backend):
    proc = _train(repo_root, f"data.backend={backend}", f"data.path={demo_shards}", f"run.out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and (tmp_path / "backbone.pt").is_file()
    assert "kNN top-1 on the held-out split" in proc.stdout + proc.stderr  # the val shards feed the monitor


@pytest.mark.slow
def test_torchrun_two_processes_train_from_shards_with_dali(repo_root, demo_shards, tmp_path):
    proc = _train(repo_root, "data.backend=dali", f"data.path={demo_shards}", f"run.out_dir={tmp_path}",
                  "run.knn_every=0", launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2",
                                               "--master_port", "29561"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2 and "world_size: 2" in (tmp_path / "config.yaml").read_text()


@pytest.mark.slow
def test_bench_loader_source_wds_puts_shard_rows_beside_the_others(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "loader", "--source", "wds", "--resolution", "16",
                           "--batch-size", "8", "--batches", "2", "--workers", "1", "--num-images", "64",
                           "--shard-samples", "16", "--warmup", "1", "--repeats", "2", "--json", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = __import__("json").loads(out.read_text())["results"]
    assert [(r["backend"], r["storage"]) for r in rows] == [
        ("ffcv", "beton"), ("dali", "arrays"), ("torchvision", "arrays"), ("dali", "wds"), ("torchvision", "wds")]
    assert all(r["images_per_s"] > 0 and "ratio_vs_torchvision" in r for r in rows)


# ---------------------------------------------------------------- remote shards (S3 API on loopback)
@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 started for the test and stopped after it; AWS variables point at it."""
    pytest.importorskip("moto", reason="moto[server] (requirements-dev.txt) serves the S3 API")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                           ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1"),
                           ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(key, value)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_dali_reads_shards_from_an_s3_server_like_local_ones(shards, s3_endpoint, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="shards")
    index_only = tmp_path / "index-only"  # the sidecar and .idx files stay local, the tars exist only in the bucket
    index_only.mkdir()
    for tar in sorted(shards.glob("train-*.tar")):
        s3.upload_file(str(tar), "shards", f"synthetic/{tar.name}")
        shutil.copy(tar.with_suffix(".idx"), index_only)
    shutil.copy(shards / "train.json", index_only)
    for rank in (0, 1):
        local = _loader("dali", shards, rank=rank, world_size=2)
        remote = build_two_view_loader("dali", source="synthetic", path=str(index_only), resolution=RES,
                                       batch_size_per_rank=BATCH, recipe=(GEOMETRY_ONLY, GEOMETRY_ONLY), rank=rank,
                                       world_size=2, seed=0, workers=1, device=torch.device("cpu"),
                                       shuffle_buffer=16, shard_url="s3://shards/synthetic")
        for a, b in zip(local, remote, strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.view1, b.view1) and torch.equal(a.labels, b.labels)
    with pytest.raises(UserError, match="remote shards are read by data.backend=dali"):
        build_two_view_loader("torchvision", source="synthetic", path=str(shards), resolution=RES,
                              batch_size_per_rank=BATCH, recipe="mocov2", rank=0, world_size=1, seed=0, workers=0,
                              device="cpu", shard_url="s3://shards/synthetic")
