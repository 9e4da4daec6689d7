"""`.beton` conversion: round trips through stock FFCV per source, bad files, CLI errors, temp-then-rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    make_bad_files,
    make_cifar100,
    make_imagefolder,
    make_jpeg_folder,
    make_tinyimagenet,
    read_beton,
    read_beton_raw,
    save_image,
)

from mixmask.errors import UserError
from pipelines.convert import convert
from pipelines.convert_writer import Reporter, validate_files, write_beton
from pipelines.sidecar import read_sidecar
from pipelines.sources import open_source
from pipelines.synthetic import generate, split_seed

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.convert", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_synthetic_round_trip_is_pixel_exact(tmp_path):
    out = tmp_path / "syn.beton"
    summary = convert("synthetic", out, split="val", num_images=150, num_classes=5, resolution=24, seed=3, workers=2)
    images, labels = read_beton(out)
    want_images, want_labels = generate(150, 5, 24, split_seed(3, "val"))
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    side = read_sidecar(out)
    assert side["source"] == "synthetic" and side["split"] == "val"
    assert side["num_written"] == summary.num_written == 150 and side["num_skipped"] == 0
    assert side["class_counts"] == [30] * 5 and len(side["class_names"]) == 5
    assert side["write"]["mode"] == "raw" and side["seconds"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("split, key", [("train", "train"), ("test", "val")])
def test_cifar100_round_trip(tmp_path, split, key):
    exp = make_cifar100(tmp_path / "data", n_train=70, n_test=30, num_classes=100)
    out = tmp_path / f"{split}.beton"
    convert("cifar100", out, root=tmp_path / "data", split=split, workers=1)
    images, labels = read_beton(out)
    np.testing.assert_array_equal(images, np.stack(exp.images[key]))
    np.testing.assert_array_equal(labels, exp.labels[key])
    side = read_sidecar(out)
    assert side["class_names"] == exp.class_names and side["split"] == key


def test_tinyimagenet_val_annotations_honoured(tmp_path):
    exp = make_tinyimagenet(tmp_path, num_classes=3, train_per_class=3, num_val=12)
    out = tmp_path / "val.beton"
    convert("tinyimagenet", out, root=tmp_path, split="val", workers=1)
    images, labels = read_beton(out)
    np.testing.assert_array_equal(labels, exp.labels["val"])
    np.testing.assert_array_equal(images, np.stack(exp.images["val"]))
    side = read_sidecar(out)
    assert side["class_names"] == exp.class_names == sorted(exp.class_names)
    assert side["num_skipped"] == 0


def test_tinyimagenet_train_labels_follow_sorted_wnids(tmp_path):
    exp = make_tinyimagenet(tmp_path, num_classes=4, train_per_class=5, num_val=2)
    out = tmp_path / "train.beton"
    summary = convert("tinyimagenet", out, root=tmp_path / "tiny-imagenet-200", split="train", workers=2)
    images, labels = read_beton(out)
    np.testing.assert_array_equal(labels, exp.labels["train"])
    np.testing.assert_array_equal(images, np.stack(exp.images["train"]))
    # the *_boxes.txt files sit beside images/, not inside: nothing to skip
    assert summary.num_skipped == 0 and summary.class_counts == [5, 5, 5, 5]


def test_imagefolder_raw_exact_and_classes_sorted(tmp_path):
    exp = make_imagefolder(tmp_path, classes=("zebra", "Apple", "cat"), per_class=4, size=(30, 44))
    out = tmp_path / "val.beton"
    convert("imagefolder", out, root=tmp_path, split="val", workers=1)
    images, labels = read_beton(out)
    np.testing.assert_array_equal(images, np.stack(exp.images["val"]))  # PNG and decoded-JPEG pixels, exactly
    np.testing.assert_array_equal(labels, exp.labels["val"])
    assert read_sidecar(out)["class_names"] == ["Apple", "cat", "zebra"]


def test_jpg_mode_close_and_max_resolution(tmp_path):
    exp = make_jpeg_folder(tmp_path / "train", 24, num_classes=3, size=64, quality=95)
    out = tmp_path / "jpg.beton"
    summary = convert("imagefolder", out, root=tmp_path, write_mode="jpg", jpeg_quality=90, max_resolution=32,
                      workers=1)
    images, labels = read_beton(out)
    assert images.shape == (24, 32, 32, 3)
    import cv2

    small = np.stack([cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA) for im in exp.images["train"]])
    err = np.abs(images.astype(np.int16) - small.astype(np.int16))
    assert err.mean() < 6, err.mean()
    assert not np.array_equal(images, small)  # it really went through JPEG
    np.testing.assert_array_equal(labels, exp.labels["train"])
    assert summary.write_mode == "jpg" and read_sidecar(out)["write"]["max_resolution"] == 32


def test_variable_sizes_kept_in_raw_mode(tmp_path):
    shapes = {"a/1.png": (20, 36), "a/2.jpg": (50, 28), "b/1.png": (33, 33), "b/2.bmp": (8, 70)}
    pictures, _ = generate(len(shapes), 3, 70, 1)
    want = [save_image(tmp_path / "train" / name, pictures[k][:h, :w].copy())
            for k, (name, (h, w)) in enumerate(shapes.items())]
    out = tmp_path / "mixed.beton"
    convert("imagefolder", out, root=tmp_path, workers=1)
    images, labels = read_beton_raw(out)
    assert [im.shape for im in images] == [im.shape for im in want]
    for got, ref in zip(images, want):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])


def test_bad_files_skipped_and_listed(tmp_path):
    exp = make_imagefolder(tmp_path, classes=("a", "b"), per_class=3, size=32, splits=("train",))
    bad = make_bad_files(tmp_path / "train" / "b", size=32)
    out = tmp_path / "out.beton"
    summary = convert("imagefolder", out, root=tmp_path, workers=2)
    images, labels = read_beton(out)
    np.testing.assert_array_equal(images, np.stack(exp.images["train"]))
    np.testing.assert_array_equal(labels, exp.labels["train"])
    side = read_sidecar(out)
    listed = {item["path"]: item["reason"] for item in side["skipped"]}
    assert set(listed) == set(bad) == {p for p, _ in summary.skipped}
    assert side["num_skipped"] == summary.num_skipped == 4 and side["num_written"] == 6
    by_kind = {kind: listed[path] for path, kind in bad.items()}
    assert "truncated" in by_kind["truncated"] and by_kind["empty"] == "empty file"
    assert by_kind["not an image"] == "not an image" and "extension" in by_kind["not an image extension"]


def test_failure_mid_write_leaves_existing_output_untouched(tmp_path):
    make_jpeg_folder(tmp_path / "train", 12, num_classes=2, size=16)
    out = tmp_path / "out.beton"
    out.write_bytes(b"previous good output")
    src = open_source("imagefolder", tmp_path, "train")
    with Reporter(False) as reporter:
        good, bad, max_hw = validate_files(src, 1, reporter)
        assert len(good) == 12 and not bad
        os.unlink(src.path(7))  # the file vanishes between validation and writing (a real race)
        with pytest.raises(UserError, match=r"nothing was written: .*img_\d+\.JPEG: missing file"):
            write_beton(src, good, out, write_mode="raw", max_resolution=None, jpeg_quality=90,
                        smart_threshold=1 << 20, max_hw=max_hw, num_workers=2, chunksize=3, reporter=reporter,
                        before_rename=lambda seconds: None)
    assert out.read_bytes() == b"previous good output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.beton", "train"]


def test_nothing_convertible_leaves_output_untouched(tmp_path):
    make_bad_files(tmp_path / "train" / "only")
    out = tmp_path / "out.beton"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="nothing to convert"):
        convert("imagefolder", out, root=tmp_path, workers=1)
    assert out.read_bytes() == b"old" and not Path(str(out) + ".json").exists()


def test_cli_converts_and_prints_summary(tmp_path):
    exp = make_imagefolder(tmp_path, classes=("b", "a"), per_class=2, size=24, splits=("train",))
    make_bad_files(tmp_path / "train" / "a", size=24)
    out = tmp_path / "cli.beton"
    proc = run_cli("imagefolder", "--root", str(tmp_path), "--split", "train", "--out", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "images written" in proc.stdout and "skipped" in proc.stdout and "truncated.jpg" in proc.stdout
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["num_written"] == 4 and side["num_skipped"] == 4 and side["class_names"] == exp.class_names


@pytest.mark.parametrize("args, needles", [
    (["cifar10", "--root", "{tmp}", "--out", "{tmp}/x.beton"], ["unknown source 'cifar10'", "cifar100"]),
    (["cifar100", "--root", "{tmp}/nope", "--out", "{tmp}/x.beton"], ["does not exist"]),
    (["cifar100", "--root", "{tmp}", "--out", "{tmp}/x.beton"], ["cifar-100-python"]),
    (["tinyimagenet", "--root", "{tmp}", "--split", "val", "--out", "{tmp}/x.beton"], ["tiny-imagenet-200"]),
    (["imagefolder", "--root", "{tmp}", "--out", "{tmp}/x.beton"], ["no train/ folder", "<class>"]),
    (["imagefolder", "--root", "{tmp}", "--split", "vall", "--out", "{tmp}/x.beton"], ["did you mean 'val'"]),
    (["imagefolder", "--out", "{tmp}/x.beton"], ["needs a root"]),
    (["synthetic", "--root", "{tmp}", "--out", "{tmp}/x.beton"], ["takes no --root"]),
    (["synthetic", "--out", "{tmp}/x.beton", "--write-mode", "png"], ["write mode 'png'"]),
    (["synthetic", "--out", "{tmp}/x.beton", "--jpeg-quality", "0"], ["jpeg_quality"]),
    (["synthetic", "--out", "{tmp}/x.beton", "--num-images", "0"], ["num_images"]),
    (["synthetic", "--out", "{tmp}/x.beton", "--resolution", "abc"], ["--resolution"]),
    (["synthetic"], ["--out"]),
    (["synthetic", "--out", "{tmp}"], ["is a folder"]),
])
def test_cli_errors_are_one_line(tmp_path, args, needles):
    (tmp_path / "stray.txt").write_text("not a dataset")
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "x.beton").exists()


def test_cli_nothing_convertible_exits_2(tmp_path):
    make_bad_files(tmp_path / "val" / "cls")
    proc = run_cli("imagefolder", "--root", str(tmp_path), "--split", "val", "--out", str(tmp_path / "x.beton"))
    assert_one_line_error(proc, "nothing to convert", "4 files were skipped")
    assert not (tmp_path / "x.beton").exists()
