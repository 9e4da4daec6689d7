"""Dataset sources read the real on-disk layouts, label by sorted class id and fail with one clear line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from fixtures_data import make_bad_files, make_cifar100, make_imagefolder, make_tinyimagenet, save_image
from PIL import Image

from mixmask.errors import UserError
from pipelines.sources import SOURCES, CorruptImageError, decode_file, open_source
from pipelines.synthetic import generate, split_seed


def test_synthetic_source_matches_generator_and_is_array_backed():
    src = open_source("synthetic", split="val", num_images=300, num_classes=6, resolution=12, seed=2)
    images, labels = src.arrays()
    want, want_labels = generate(300, 6, 12, split_seed(2, "val"))
    np.testing.assert_array_equal(images, want)
    np.testing.assert_array_equal(labels, want_labels)
    # load() builds blocks on demand; it must agree with the whole-array view at block edges too
    for i in (0, 255, 256, 299):
        np.testing.assert_array_equal(src.load(i), want[i])
        assert src.label(i) == want_labels[i]
    assert len(src) == 300 and src.path(0) is None and len(src.class_names) == 6


def test_cifar100_pickles(tmp_path):
    exp = make_cifar100(tmp_path, n_train=20, n_test=10, num_classes=100)
    for split, key in (("train", "train"), ("val", "val"), ("test", "val")):
        src = open_source("cifar100", tmp_path, split)
        images, labels = src.arrays()
        np.testing.assert_array_equal(images, np.stack(exp.images[key]))
        assert labels.tolist() == exp.labels[key] and src.label(3) == exp.labels[key][3]
        assert src.class_names == exp.class_names and src.split == key and src.path(0) is None
    # the cifar-100-python folder itself is accepted as root too
    assert len(open_source("cifar100", tmp_path / "cifar-100-python", "train")) == 20


def test_cifar100_bad_pickle_is_one_line(tmp_path):
    make_cifar100(tmp_path, n_train=4, n_test=2, num_classes=5)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)  # no fine labels
    with pytest.raises(UserError, match="not a readable CIFAR-100 pickle"):
        open_source("cifar100", tmp_path, "train")


def test_tinyimagenet_layout(tmp_path):
    exp = make_tinyimagenet(tmp_path, num_classes=3, train_per_class=2, num_val=7)
    train = open_source("tinyimagenet", tmp_path, "train")
    assert train.class_names == exp.class_names == sorted(exp.class_names)
    assert [train.path(i) for i in range(len(train))] == exp.paths["train"]
    assert [train.label(i) for i in range(len(train))] == exp.labels["train"]
    val = open_source("tinyimagenet", tmp_path / "tiny-imagenet-200", "val")
    assert [val.path(i) for i in range(len(val))] == exp.paths["val"]
    assert [val.label(i) for i in range(len(val))] == exp.labels["val"]
    np.testing.assert_array_equal(val.load(2), exp.images["val"][2])
    assert val.ignored == []
    with pytest.raises(UserError, match="split for tinyimagenet"):
        open_source("tinyimagenet", tmp_path, "test")


def test_tinyimagenet_val_without_train_uses_sorted_wnids(tmp_path):
    exp = make_tinyimagenet(tmp_path, num_classes=4, num_val=5, with_train=False)
    val = open_source("tinyimagenet", tmp_path, "val")
    assert val.class_names == exp.class_names  # wnids.txt is shuffled on disk
    assert [val.label(i) for i in range(len(val))] == exp.labels["val"]


def test_tinyimagenet_val_problems_are_listed(tmp_path):
    make_tinyimagenet(tmp_path, num_classes=2, train_per_class=1, num_val=3)
    base = tmp_path / "tiny-imagenet-200" / "val"
    (base / "images" / "val_1.JPEG").unlink()
    save_image(base / "images" / "stray.JPEG", np.zeros((8, 8, 3), np.uint8))
    with open(base / "val_annotations.txt", "a") as f:
        f.write("val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    val = open_source("tinyimagenet", tmp_path, "val")
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in val.ignored}
    assert reasons["val_1.JPEG"].endswith("missing") and "unknown class" in reasons["val_9.JPEG"]
    assert reasons["stray.JPEG"] == "not in val_annotations.txt" and len(val) == 2


def test_imagefolder_sorted_classes_and_ignored_files(tmp_path):
    exp = make_imagefolder(tmp_path, classes=("zebra", "Apple", "cat"), per_class=3, splits=("train",))
    bad = make_bad_files(tmp_path / "train" / "cat")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "empty_class").mkdir()
    src = open_source("imagefolder", tmp_path, "train")
    assert src.class_names == ["Apple", "cat", "empty_class", "zebra"]
    good = [i for i in range(len(src)) if src.path(i) in exp.paths["train"]]
    assert [src.label(i) for i in good] == [0, 0, 0, 1, 1, 1, 3, 3, 3]
    assert [p for p, _ in src.ignored] == [p for p, kind in bad.items() if kind == "not an image extension"]
    for i in range(len(src)):
        if src.path(i) in bad:
            with pytest.raises(CorruptImageError):
                src.load(i)
        else:
            np.testing.assert_array_equal(src.load(i), exp.images["train"][exp.paths["train"].index(src.path(i))])


def test_decode_file_converts_modes_and_names_problems(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    rgba = np.dstack([np.full((5, 5, 3), 200, np.uint8), np.full((5, 5), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = decode_file(str(tmp_path / "g.png"))
    assert out.shape == (6, 8, 3) and (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    assert decode_file(str(tmp_path / "a.png")).shape == (5, 5, 3)
    bad = make_bad_files(tmp_path / "bad")
    reasons = {}
    for path, kind in bad.items():
        with pytest.raises(CorruptImageError) as info:
            decode_file(path, draft_size=1)
        reasons[kind] = info.value.reason
    assert reasons["empty"] == "empty file" and reasons["not an image"] == "not an image"
    assert reasons["truncated"].startswith("truncated")
    with pytest.raises(CorruptImageError, match="missing file"):
        decode_file(str(tmp_path / "gone.jpg"))


@pytest.mark.parametrize("name, root, split, match", [
    ("cifar", None, "train", r"unknown source 'cifar' \(did you mean 'cifar100'\?\); valid: cifar100, imagefolder"),
    ("imagefolder", None, "train", "needs a root"),
    ("imagefolder", "{tmp}/missing", "train", "does not exist"),
    ("imagefolder", "{tmp}/file.txt", "train", "is not a folder"),
    ("imagefolder", "{tmp}", "train", "no train/ folder"),
    ("imagefolder", "{tmp}", "val", "has no class folders .*loose images"),
    ("imagefolder", "{tmp}", "test", "unknown split for imagefolder 'test'"),
    ("cifar100", "{tmp}", "train", "does not hold the CIFAR-100 python layout"),
    ("tinyimagenet", "{tmp}", "train", "does not hold the Tiny-ImageNet layout"),
])
def test_user_errors(tmp_path, name, root, split, match):
    (tmp_path / "file.txt").write_text("x")
    save_image(tmp_path / "val" / "loose.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=match):
        open_source(name, root.format(tmp=tmp_path) if root else None, split)


def test_synthetic_parameter_errors():
    with pytest.raises(UserError, match="num_classes"):
        open_source("synthetic", num_classes=0)
    with pytest.raises(UserError, match="resolution"):
        open_source("synthetic", resolution=2)
    assert SOURCES == ("synthetic", "cifar100", "tinyimagenet", "imagefolder")
