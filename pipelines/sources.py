"""Dataset sources as laid out on disk when downloaded: one indexable interface for conversion and loaders.

Labels follow sorted class ids, as torchvision's ImageFolder does. Array-backed sources (synthetic, cifar100)
expose all pixels through `arrays()`; file-based sources (tinyimagenet, imagefolder) expose `path(i)` and decode
on `load(i)` with Pillow, which (unlike OpenCV) refuses truncated JPEGs instead of padding them with grey.
"""

from __future__ import annotations

import abc
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mixmask.errors import UserError, choice_error
from pipelines import synthetic

SOURCES: tuple[str, ...] = ("synthetic", "cifar100", "tinyimagenet", "imagefolder")
# torchvision's IMG_EXTENSIONS, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Decompression-bomb guard: refuse images above this many pixels rather than exhausting memory.
MAX_PIXELS = 20000 * 20000
# FFCV stores width and height as uint16.
MAX_SIDE = 65535


class CorruptImageError(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image, absurd size)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def decode_file(path: str, *, draft_size: int | None = None) -> np.ndarray:
    """Decode an image file to HWC uint8 RGB, raising CorruptImageError with a short reason.

    draft_size lets JPEG decoding use DCT scaling (much cheaper) when only validity matters: the decoder still
    reads every scan, so truncation is still caught.
    """
    try:
        if os.path.getsize(path) == 0:
            raise CorruptImageError(path, "empty file")
        with Image.open(path) as im:
            w, h = im.size
            if w < 1 or h < 1 or w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
                raise CorruptImageError(path, f"unsupported size {w}x{h}")
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))
            rgb = im.convert("RGB")  # forces the full decode; grey, palette, RGBA and CMYK become RGB
            return np.asarray(rgb, dtype=np.uint8)
    except CorruptImageError:
        raise
    except FileNotFoundError:
        raise CorruptImageError(path, "missing file") from None
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # Pillow reports truncation and bad data as OSError/SyntaxError; keep its words behind a stable prefix.
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        kind = "truncated" if "truncat" in detail.lower() else "corrupt"
        raise CorruptImageError(path, f"{kind} ({detail})") from None


class Source(abc.ABC):
    """An indexable dataset split: labels are cheap, images decode on demand."""

    name: str = ""
    split: str = "train"
    class_names: list[str]
    # Files met while indexing that are not images at all (path, reason): skipped, reported by conversion.
    ignored: list[tuple[str, str]]

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def label(self, i: int) -> int:
        ...

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        ...

    def path(self, i: int) -> str | None:
        return None

    def arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None

    def describe(self) -> dict:
        """Extra facts for the sidecar (resolution, seed, root, ...)."""
        return {}


class ArraySource(Source):
    """A source held as (N, H, W, 3) uint8 images and (N,) int64 labels."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
        self.name, self.split, self.class_names, self.ignored = name, split, class_names, []
        self._images, self._labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def load(self, i: int) -> np.ndarray:
        return self._images[i]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._images, self._labels


class SyntheticSource(Source):
    """The procedurally generated default; images are made in blocks on demand (deterministic per index)."""

    block_size = 256

    def __init__(self, split: str, num_images: int, num_classes: int, resolution: int, seed: int):
        self.name, self.split, self.ignored = "synthetic", split, []
        self.num_images, self.num_classes, self.resolution, self.seed = num_images, num_classes, resolution, seed
        self.stream = synthetic.split_seed(seed, split)
        self.class_names = [f"class_{c:0{len(str(num_classes - 1))}d}" for c in range(num_classes)]
        self._block_start = -1
        self._block: np.ndarray | None = None
        self._all: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_images

    def label(self, i: int) -> int:
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        return i % self.num_classes

    def load(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        # Readers (the FFCV writer included) walk contiguous chunks, so one vectorised block serves many calls.
        start = i - i % self.block_size
        if start != self._block_start:
            count = min(self.block_size, self.num_images - start)
            self._block, _ = synthetic.generate(count, self.num_classes, self.resolution, self.stream, start=start)
            self._block_start = start
        return self._block[i - start]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._all is None:
            self._all = synthetic.generate(self.num_images, self.num_classes, self.resolution, self.stream)
        return self._all

    def describe(self) -> dict:
        return {"num_classes": self.num_classes, "resolution": self.resolution, "seed": self.seed,
                "seed_stream": self.stream}


class FileSource(Source):
    """A list of (image file, label) pairs decoded with Pillow."""

    def __init__(self, name: str, split: str, root: Path, files: list[str], labels: list[int],
                 class_names: list[str], ignored: list[tuple[str, str]]):
        self.name, self.split, self.root, self.class_names, self.ignored = name, split, root, class_names, ignored
        self._files, self._labels = files, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def load(self, i: int) -> np.ndarray:
        return decode_file(self._files[i])

    def path(self, i: int) -> str:
        return self._files[i]

    def describe(self) -> dict:
        return {"root": str(self.root)}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_class_dir(folder: Path, ignored: list[tuple[str, str]]) -> list[str]:
    """Image files under a class folder (recursively, sorted); other visible files go to `ignored`."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue  # .DS_Store and friends are not worth a line in the report
            full = os.path.join(dirpath, fname)
            if _is_image_name(fname):
                found.append(full)
            else:
                ignored.append((full, "not an image file extension"))
    return found


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _open_cifar100(root: Path, split: str) -> ArraySource:
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    fname = "train" if split == "train" else "test"
    expected = "expected ROOT/cifar-100-python/{train,test,meta} (the CIFAR-100 python version)"
    if not (base / fname).is_file() or not (base / "meta").is_file():
        raise UserError(f"{root} does not hold the CIFAR-100 python layout: {expected}")
    try:
        with open(base / fname, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        with open(base / "meta", "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        meta = {k.decode() if isinstance(k, bytes) else k: v for k, v in meta.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["fine_labels"], dtype=np.int64)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored as planar R, G, B rows
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError, TypeError) as err:
        raise UserError(f"{base / fname} is not a readable CIFAR-100 pickle ({type(err).__name__}: {err}); "
                        f"{expected}") from None
    if len(labels) != len(images) or (len(labels) and (labels.min() < 0 or labels.max() >= len(names))):
        raise UserError(f"{base / fname}: {len(images)} images, {len(labels)} fine labels and "
                        f"{len(names)} class names do not agree")
    return ArraySource("cifar100", split, np.ascontiguousarray(images), labels, names)


def _open_tinyimagenet(root: Path, split: str) -> FileSource:
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    expected = ("expected ROOT/tiny-imagenet-200/ with train/<wnid>/images/*.JPEG, wnids.txt, "
                "val/images/*.JPEG and val/val_annotations.txt")
    if (base / "train").is_dir() and _subdirs(base / "train"):
        wnids = _subdirs(base / "train")
    elif (base / "wnids.txt").is_file():
        wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    else:
        raise UserError(f"{root} does not hold the Tiny-ImageNet layout (no train/ classes, no wnids.txt): {expected}")
    label_of = {w: k for k, w in enumerate(wnids)}
    files: list[str] = []
    labels: list[int] = []
    ignored: list[tuple[str, str]] = []
    if split == "train":
        if not (base / "train").is_dir():
            raise UserError(f"{root} has no train/ folder: {expected}")
        for w in wnids:
            folder = base / "train" / w / "images"
            found = _scan_class_dir(folder if folder.is_dir() else base / "train" / w, ignored)
            files += found
            labels += [label_of[w]] * len(found)
        return FileSource("tinyimagenet", split, base, files, labels, wnids, ignored)
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file() or not (base / "val" / "images").is_dir():
        raise UserError(f"{root} has no val/val_annotations.txt with val/images/: {expected}")
    listed: set[str] = set()
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or not parts[0].strip():
            continue
        full = str(base / "val" / "images" / parts[0].strip())
        listed.add(parts[0].strip())
        if len(parts) < 2 or parts[1].strip() not in label_of:
            ignored.append((full, f"val_annotations.txt line {lineno}: unknown class"))
        elif not os.path.isfile(full):
            ignored.append((full, "listed in val_annotations.txt but missing"))
        else:
            files.append(full)
            labels.append(label_of[parts[1].strip()])
    for name in sorted(os.listdir(base / "val" / "images")):
        if name not in listed and not name.startswith("."):
            ignored.append((str(base / "val" / "images" / name), "not in val_annotations.txt"))
    order = np.argsort(files, kind="stable")  # file-name order, independent of the annotation file's order
    return FileSource("tinyimagenet", split, base, [files[k] for k in order], [labels[k] for k in order], wnids,
                      ignored)


def _open_imagefolder(root: Path, split: str) -> FileSource:
    folder = root / split
    expected = f"expected ROOT/{split}/<class>/<image> (ImageNet style)"
    if not folder.is_dir():
        raise UserError(f"{root} has no {split}/ folder: {expected}")
    classes = _subdirs(folder)
    if not classes:
        loose = [n for n in os.listdir(folder) if _is_image_name(n)]
        hint = " (it holds loose images: sort them into one folder per class first)" if loose else ""
        raise UserError(f"{folder} has no class folders{hint}: {expected}")
    files: list[str] = []
    labels: list[int] = []
    ignored: list[tuple[str, str]] = []
    for k, c in enumerate(classes):
        found = _scan_class_dir(folder / c, ignored)
        files += found
        labels += [k] * len(found)
    return FileSource("imagefolder", split, root, files, labels, classes, ignored)


def open_source(name: str, root: str | Path | None = None, split: str = "train", *, num_images: int = 2000,
                num_classes: int = 10, resolution: int = 32, seed: int = 0) -> Source:
    """Open split `split` of source `name`; raises UserError (one line) for anything the user can fix."""
    if name not in SOURCES:
        raise choice_error("source", name, SOURCES)
    splits = ("train", "val", "test") if name == "cifar100" else ("train", "val")
    if split not in splits:
        raise choice_error(f"split for {name}", split, splits)
    split = "val" if split == "test" else split
    if name == "synthetic":
        for key, value, low in (("num_images", num_images, 1), ("num_classes", num_classes, 1),
                                ("resolution", resolution, 4)):
            if value < low:
                raise UserError(f"{key} must be at least {low}, got {value}")
        if resolution > MAX_SIDE:
            raise UserError(f"resolution must be at most {MAX_SIDE}, got {resolution}")
        return SyntheticSource(split, num_images, num_classes, resolution, seed)
    if root is None or str(root) == "":
        raise UserError(f"source {name!r} needs a root folder (--root DIR)")
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"root {root} does not exist")
    if not root.is_dir():
        raise UserError(f"root {root} is not a folder")
    opener = {"cifar100": _open_cifar100, "tinyimagenet": _open_tinyimagenet, "imagefolder": _open_imagefolder}
    return opener[name](root, split)
