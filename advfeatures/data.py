"""Reading CIFAR-10-like data from every supported source into plain arrays.

Supported sources (``DataConfig.source``):

- ``torchvision``: downloads the official cifar-10-python.tar.gz with torchvision (needs internet);
- an ImageFolder directory ``<dir>/{train,test}/<class>/<image>``; labels follow sorted class names;
- a zip of such a directory (the ``train/`` and ``test/`` folders at its top, or under one folder);
- the official ``cifar-10-python.tar.gz``, or its extracted ``cifar-10-batches-py`` folder.

All give a :class:`RawDataset`: uint8 images (N, 3, H, W), int64 labels, class names. Within a
split, ImageFolder sources are read in (class, file name) order, so a directory and its zip give
identical arrays (so their test split is sorted by class: its first 1,000 images of CIFAR-10 are
all airplanes; a part of a split is taken with :func:`classes_in_turn`, never as its head). Any
problem raises :class:`DataSourceError` saying what was expected.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any
from pathlib import Path, PurePosixPath

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
CIFAR_BATCHES = "cifar-10-batches-py"
EXPECTED = ("an ImageFolder directory or zip with train/<class>/<image> and test/<class>/<image>, "
            "the official cifar-10-python.tar.gz, its extracted cifar-10-batches-py folder, "
            "or 'torchvision' to download CIFAR-10")


class DataSourceError(ValueError):
    """A data source is missing or malformed; the message says what was expected."""


class DownloadError(DataSourceError):
    """The torchvision download failed (no internet): the CLI exits with 3, on which `make demo`
    falls back to the tiny synthetic path."""


@dataclass
class Split:
    images: np.ndarray  # (N, 3, H, W) uint8
    labels: np.ndarray  # (N,) int64


@dataclass
class RawDataset:
    train: Split
    test: Split
    classes: list[str]

    def content_sha256(self) -> str:
        """Hash of the decoded arrays and class names: equal for every source format."""
        h = hashlib.sha256()
        h.update(repr(self.classes).encode())
        for s in (self.train, self.test):
            h.update(repr(s.images.shape).encode())
            h.update(np.ascontiguousarray(s.images).tobytes())
            h.update(np.ascontiguousarray(s.labels.astype("<i8")).tobytes())
        return h.hexdigest()


def _fail(source: str | os.PathLike, why: str) -> DataSourceError:
    return DataSourceError(f"cannot read data source {str(source)!r}: {why}. Expected {EXPECTED}.")


# --- decoding -------------------------------------------------------------------------------------

def _decode(blob: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as e:
        raise DataSourceError(f"cannot decode image {where}: {e}") from None
    return arr.transpose(2, 0, 1)


def _stack(source, entries: list[tuple[str, str, bytes | Path]], classes: list[str], split: str) -> Split:
    """entries: (class, name, bytes or path) -> Split with labels from ``classes``."""
    if not entries:
        raise _fail(source, f"the {split}/ split holds no images ({', '.join(IMAGE_EXTS)})")
    entries.sort(key=lambda e: (e[0], e[1]))
    arrays = []
    for cls, name, blob in entries:
        data = blob.read_bytes() if isinstance(blob, Path) else blob
        arrays.append(_decode(data, f"{split}/{cls}/{name}"))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise _fail(source, f"images in {split}/ differ in size: {sorted(shapes)[:3]}")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c, _, _ in entries], dtype=np.int64)
    return Split(np.stack(arrays), labels)


def _from_folder_entries(source, found: dict[str, dict[str, list[tuple[str, bytes | Path]]]]) -> RawDataset:
    for split in ("train", "test"):
        if not found.get(split):
            raise _fail(source, f"no {split}/<class>/ folders with images found")
    classes = sorted(found["train"])
    if sorted(found["test"]) != classes:
        raise _fail(source, f"train/ classes {classes} differ from test/ classes {sorted(found['test'])}")
    splits = {}
    for split in ("train", "test"):
        entries = [(c, n, b) for c, items in found[split].items() for n, b in items]
        splits[split] = _stack(source, entries, classes, split)
    _check_shapes(source, splits["train"], splits["test"])
    return RawDataset(splits["train"], splits["test"], classes)


def _check_shapes(source, train: Split, test: Split) -> None:
    if train.images.shape[1:] != test.images.shape[1:]:
        raise _fail(source, f"train images {train.images.shape[1:]} and test images {test.images.shape[1:]} differ")


def read_image_folder(path: Path) -> RawDataset:
    found: dict[str, dict[str, list]] = {}
    for split in ("train", "test"):
        d = path / split
        if not d.is_dir():
            continue
        for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            items = [(f.name, f) for f in cls_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS]
            if items:
                found.setdefault(split, {})[cls_dir.name] = items
    return _from_folder_entries(path, found)


def read_image_zip(path: Path) -> RawDataset:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _fail(path, f"not a readable zip ({e})") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and PurePosixPath(n).suffix.lower() in IMAGE_EXTS]
        parts = [PurePosixPath(n).parts for n in names]
        # allow one enclosing folder: <top>/train/<class>/<file>
        depth4 = [p for p in parts if len(p) == 4 and p[1] in ("train", "test")]
        offset = 1 if depth4 and not any(len(p) == 3 and p[0] in ("train", "test") for p in parts) else 0
        found: dict[str, dict[str, list]] = {}
        for n, p in zip(names, parts):
            p = p[offset:]
            if len(p) == 3 and p[0] in ("train", "test"):
                found.setdefault(p[0], {}).setdefault(p[1], []).append((p[2], zf.read(n)))
    return _from_folder_entries(path, found)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        return pickle.loads(blob, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed batch
        raise DataSourceError(f"cannot unpickle CIFAR batch {where}: {e}") from None


def _cifar_from_batches(source, batches: dict[str, bytes]) -> RawDataset:
    train_names = sorted(n for n in batches if n.startswith("data_batch_"))
    missing = [n for n in ("batches.meta", "test_batch") if n not in batches]
    if not train_names or missing:
        raise _fail(source, f"CIFAR batches missing: {missing or ['data_batch_*']}")
    meta = _unpickle(batches["batches.meta"], "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta.get(b"label_names", [])]
    if not classes:
        raise _fail(source, "batches.meta has no label_names")

    def load(names):
        xs, ys = [], []
        for n in names:
            d = _unpickle(batches[n], n)
            if b"data" not in d or b"labels" not in d:
                raise _fail(source, f"{n} lacks data/labels")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return Split(np.concatenate(xs), np.concatenate(ys))

    train, test = load(train_names), load(["test_batch"])
    for s in (train, test):
        if s.labels.size and (s.labels.min() < 0 or s.labels.max() >= len(classes)):
            raise _fail(source, f"labels outside 0..{len(classes) - 1}")
    return RawDataset(train, test, classes)


def read_cifar_folder(path: Path) -> RawDataset:
    return _cifar_from_batches(path, {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()})


def read_cifar_tar(path: Path) -> RawDataset:
    try:
        with tarfile.open(path, "r:*") as tf:
            batches = {PurePosixPath(m.name).name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _fail(path, f"not a readable tar archive ({e})") from None
    return _cifar_from_batches(path, batches)


def locate(source: str) -> Path:
    """Resolve a local source path, or raise DataSourceError."""
    path = Path(source).expanduser()
    if not path.exists():
        raise _fail(source, "the path does not exist")
    return path


def reader_for(path: Path):
    """The reader function for a local path."""
    if path.is_dir():
        if (path / "batches.meta").is_file():
            return read_cifar_folder
        if (path / CIFAR_BATCHES / "batches.meta").is_file():
            return lambda p: read_cifar_folder(p / CIFAR_BATCHES)
        if (path / "train").is_dir() or (path / "test").is_dir():
            return read_image_folder
        raise _fail(path, "the folder has neither train/ and test/ nor CIFAR batch files")
    name = path.name.lower()
    if name.endswith(".zip"):
        return read_image_zip
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return read_cifar_tar
    raise _fail(path, "unsupported file type (use .zip, .tar.gz or a folder)")


def download_torchvision(root: str) -> Path:
    """Download CIFAR-10 with torchvision; returns the tar.gz path."""
    import torchvision

    root_p = Path(root).expanduser()
    try:
        torchvision.datasets.CIFAR10(str(root_p), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise DownloadError(
            f"could not download CIFAR-10 with torchvision into {root_p} ({type(e).__name__}: {e}). "
            "Without internet, pass a local copy: --data PATH (a zip or folder of train/ and test/, "
            "or cifar-10-python.tar.gz, which https://www.cs.toronto.edu/~kriz/cifar-10.html serves; "
            "fetch it on a machine with internet and copy it here). Or run without CIFAR-10: "
            "`advfeatures synth tiny.zip && advfeatures run --profile tiny --data tiny.zip` "
            "(synthetic images, about a minute; `make demo` does this by itself when it cannot download)") from None
    return root_p / "cifar-10-python.tar.gz"


def probe(path: Path) -> list[str]:
    """Check a local source cheaply before any work: open it, list the classes of both splits
    (the same), and decode one image of each class in each split (image zips and folders), or
    read the CIFAR metadata (batch folders and tars: every batch listed). Returns the classes;
    raises DataSourceError, naming the fix, on what ``read_source`` would fail on later."""
    reader = reader_for(path)
    if reader is read_image_zip:
        return _probe_zip(path)
    if reader is read_image_folder:
        found = {split: {c.name: next((f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTS), None)
                         for c in sorted(p for p in (path / split).iterdir() if p.is_dir())}
                 for split in ("train", "test") if (path / split).is_dir()}
        found = {s: {c: f for c, f in cs.items() if f is not None} for s, cs in found.items()}
        return _probe_found(path, found, lambda f: f.read_bytes())
    if reader is read_cifar_tar:
        try:
            with tarfile.open(path, "r:*") as tf:
                names = {PurePosixPath(m.name).name for m in tf.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise _fail(path, f"not a readable tar archive ({e})") from None
    else:
        folder = path if (path / "batches.meta").is_file() else path / CIFAR_BATCHES
        names = {p.name for p in folder.iterdir() if p.is_file()}
    missing = [n for n in ("batches.meta", "test_batch") if n not in names]
    if missing or not any(n.startswith("data_batch_") for n in names):
        raise _fail(path, f"CIFAR batches missing: {missing or ['data_batch_*']}")
    return []


def _probe_zip(path: Path) -> list[str]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _fail(path, f"not a readable zip ({e}); is the file complete?") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and PurePosixPath(n).suffix.lower() in IMAGE_EXTS]
        parts = [PurePosixPath(n).parts for n in names]
        depth4 = [p for p in parts if len(p) == 4 and p[1] in ("train", "test")]
        offset = 1 if depth4 and not any(len(p) == 3 and p[0] in ("train", "test") for p in parts) else 0
        found: dict[str, dict[str, str]] = {}
        for n, p in zip(names, parts):
            p = p[offset:]
            if len(p) == 3 and p[0] in ("train", "test"):
                found.setdefault(p[0], {}).setdefault(p[1], n)

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise _fail(path, f"cannot read {name} from the zip ({e}); is the file complete?") from None

        return _probe_found(path, found, read)


def _probe_found(source, found: dict[str, dict[str, Any]], read: Any) -> list[str]:
    for split in ("train", "test"):
        if not found.get(split):
            raise _fail(source, f"no {split}/<class>/ folders with images found")
    classes = sorted(found["train"])
    if sorted(found["test"]) != classes:
        raise _fail(source, f"train/ classes {classes} differ from test/ classes {sorted(found['test'])}")
    for split in ("train", "test"):
        for cls, item in sorted(found[split].items()):
            _decode(read(item), f"{split}/{cls}/{PurePosixPath(str(item)).name} of {source}")
    return classes


def read_source(path: Path) -> RawDataset:
    ds = reader_for(path)(path)
    if ds.train.images.shape[1] != 3:
        raise _fail(path, f"images must have 3 channels, got {ds.train.images.shape[1]}")
    return ds


def classes_in_turn(y: np.ndarray, n: int) -> np.ndarray:
    """The indices of ``n`` images of a split with labels ``y``, the classes taking turns: the first
    image of each class (classes in label order), then the second of each, and so on; each class's
    images in split order. Balanced (exactly n / classes each when it divides and every class has
    enough) whatever the split's order: a class-sorted split's head would be one class. Sorted."""
    y = np.asarray(y)
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    order = np.argsort(y, kind="stable")  # by class, split order within each
    start = np.searchsorted(y[order], y[order])  # where each image's class begins in ``order``
    rank = np.arange(len(y)) - start  # the image's place within its class
    turn = np.lexsort((y[order], rank))  # by place within class, then class
    return np.sort(order[turn[:n]])
