"""Small real on-disk datasets for tests: CIFAR-100 pickles, tiny-imagenet-200 folders, ImageFolders, bad files.

Every builder returns what a correct reader must produce (class names in label order, and per split the samples in
the order a source lists them), so tests compare against it instead of re-deriving it. Image content comes from the
synthetic generator: cheap, structured (so JPEG round trips are meaningful) and different for every image.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.synthetic import generate


@dataclass
class Expected:
    """What reading a fixture must give: class names in label order and, per split, images + labels in order."""

    root: Path
    class_names: list[str]
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)
    paths: dict[str, list[str]] = field(default_factory=dict)


def _pictures(n: int, size: int | tuple[int, int], seed: int) -> np.ndarray:
    """n distinct RGB pictures of size (H, W) (square when an int)."""
    h, w = (size, size) if isinstance(size, int) else size
    images, _ = generate(n, 7, max(h, w), seed)
    return np.ascontiguousarray(images[:, :h, :w])


def save_image(path: Path, image: np.ndarray, *, quality: int = 95) -> np.ndarray:
    """Write `image` (format from the suffix) and return the pixels a decoder gets back from the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        Image.fromarray(image).save(path, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(path)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_cifar100(root: Path, n_train: int, n_test: int, *, num_classes: int = 100, seed: int = 0) -> Expected:
    """`root/cifar-100-python/{train,test,meta}` pickled as the real download (bytes keys, planar rows)."""
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    names = sorted(f"fine_{c:03d}" for c in range(num_classes))
    rng = np.random.default_rng(seed)
    exp = Expected(Path(root), names)
    for fname, split, n in (("train", "train", n_train), ("test", "val", n_test)):
        images = _pictures(n, 32, seed + (0 if split == "train" else 1))
        labels = rng.integers(0, num_classes, n).tolist()
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane per row
        batch = {b"batch_label": f"{fname} batch".encode(), b"filenames": [f"img_{k}.png".encode() for k in range(n)],
                 b"fine_labels": labels, b"coarse_labels": [lab // 5 for lab in labels], b"data": data}
        with open(base / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        exp.images[split], exp.labels[split] = list(images), labels
    meta = {b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)]}
    with open(base / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return exp


def make_tinyimagenet(root: Path, *, num_classes: int = 3, train_per_class: int = 4, num_val: int = 6,
                      size: int = 64, seed: int = 0, with_train: bool = True) -> Expected:
    """`root/tiny-imagenet-200/` as downloaded: wnids.txt, words.txt, train/<wnid>/images, val with annotations.

    wnids.txt is written in a shuffled order, as the real one is not sorted; labels follow sorted wnids.
    """
    base = Path(root) / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    wnids = sorted(f"n{1000000 + 7919 * (c + 1):08d}" for c in range(num_classes))
    rng = np.random.default_rng(seed)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in rng.permutation(wnids)))
    (base / "words.txt").write_text("".join(f"{w}\tthing {k}\n" for k, w in enumerate(wnids)))
    exp = Expected(Path(root), wnids)
    pics = _pictures(num_classes * train_per_class + num_val + 1, size, seed)
    if with_train:
        exp.images["train"], exp.labels["train"], exp.paths["train"] = [], [], []
        for c, w in enumerate(wnids):
            (base / "train" / w).mkdir(parents=True, exist_ok=True)
            boxes = []
            for k in range(train_per_class):
                path = base / "train" / w / "images" / f"{w}_{k}.JPEG"
                exp.images["train"].append(save_image(path, pics[c * train_per_class + k]))
                exp.labels["train"].append(c)
                exp.paths["train"].append(str(path))
                boxes.append(f"{w}_{k}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
            (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    val_labels = rng.integers(0, num_classes, num_val).tolist()
    lines, val = [], []
    for k in range(num_val):
        path = base / "val" / "images" / f"val_{k}.JPEG"
        pixels = save_image(path, pics[num_classes * train_per_class + k])
        lines.append(f"val_{k}.JPEG\t{wnids[val_labels[k]]}\t0\t1\t{size - 2}\t{size - 1}\n")
        val.append((str(path), val_labels[k], pixels))
    # Annotation order differs from file-name order (val_10 < val_2 as text): a reader must not rely on either.
    (base / "val" / "val_annotations.txt").write_text("".join(reversed(lines)))
    val.sort(key=lambda item: item[0])
    exp.paths["val"] = [p for p, _, _ in val]
    exp.labels["val"] = [lab for _, lab, _ in val]
    exp.images["val"] = [img for _, _, img in val]
    save_image(base / "test" / "images" / "test_0.JPEG", pics[-1])
    return exp


def make_jpeg_folder(folder: Path, num_images: int, *, num_classes: int = 4, size: int | tuple[int, int] = 32,
                     quality: int = 90, suffix: str = ".JPEG", seed: int = 0) -> Expected:
    """`folder/<class>/<image>` with num_images JPEGs spread over the classes (an ImageFolder split folder)."""
    folder = Path(folder)
    names = [f"class_{c:02d}" for c in range(num_classes)]
    pics = _pictures(num_images, size, seed)
    exp = Expected(folder, names)
    items = []
    for k in range(num_images):
        c = k % num_classes
        path = folder / names[c] / f"img_{k:06d}{suffix}"
        items.append((str(path), c, save_image(path, pics[k], quality=quality)))
    items.sort(key=lambda item: (item[1], item[0]))
    exp.paths["train"] = [p for p, _, _ in items]
    exp.labels["train"] = [lab for _, lab, _ in items]
    exp.images["train"] = [img for _, _, img in items]
    return exp


def make_imagefolder(root: Path, *, classes: tuple[str, ...] = ("zebra", "Apple", "cat"), per_class: int = 3,
                     size: int | tuple[int, int] = 40, splits: tuple[str, ...] = ("train", "val"),
                     seed: int = 0) -> Expected:
    """`root/<split>/<class>/*` ImageNet style, JPEG and PNG mixed; class names sorted as torchvision sorts them."""
    names = sorted(classes)  # byte order: 'Apple' < 'cat' < 'zebra'
    exp = Expected(Path(root), names)
    pics = _pictures(len(splits) * len(names) * per_class, size, seed)
    k = 0
    for split in splits:
        items = []
        for c, name in enumerate(names):
            for j in range(per_class):
                suffix = (".JPEG", ".png", ".jpg")[j % 3]
                path = Path(root) / split / name / f"{name}_{j:03d}{suffix}"
                items.append((str(path), c, save_image(path, pics[k])))
                k += 1
        items.sort(key=lambda item: (item[1], item[0]))
        exp.paths[split] = [p for p, _, _ in items]
        exp.labels[split] = [lab for _, lab, _ in items]
        exp.images[split] = [img for _, _, img in items]
    return exp


def make_bad_files(folder: Path, *, size: int = 40) -> dict[str, str]:
    """Unreadable files in `folder`: truncated JPEG, empty file, text named .jpg, a README; path → kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "tmp_source.jpg"
    save_image(good, _pictures(1, size, 99)[0])
    data = good.read_bytes()
    good.unlink()
    bad = {
        folder / "truncated.jpg": ("truncated", data[: len(data) // 2]),
        folder / "empty.jpg": ("empty", b""),
        folder / "text.jpg": ("not an image", b"this is not a JPEG\n"),
        folder / "README.txt": ("not an image extension", b"notes\n"),
    }
    for path, (_, content) in bad.items():
        path.write_bytes(content)
    return {str(p): kind for p, (kind, _) in bad.items()}


def read_beton(path: Path, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a fixed-resolution `.beton` in file order through stock `ffcv.loader.Loader` on the CPU."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for image, label in loader:
        images.append(image.numpy().copy())
        labels.append(label.numpy().reshape(-1).copy())
    return np.concatenate(images), np.concatenate(labels)


def read_beton_raw(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Samples of a raw-mode `.beton` of any resolutions, read with FFCV's own Reader (no decoding needed)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta, alloc = reader.metadata, reader.alloc_table
    raw = np.memmap(str(path), dtype=np.uint8, mode="r")
    images = []
    for row in meta["f0"]:
        assert row["mode"] == 1, "not a raw-mode sample"
        ptr = int(row["data_ptr"])
        size = int(alloc[alloc["ptr"] == ptr]["size"][0])
        images.append(np.array(raw[ptr: ptr + size]).reshape(int(row["height"]), int(row["width"]), 3))
    return images, np.asarray(meta["f1"], dtype=np.int64)
