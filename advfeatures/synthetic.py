"""A tiny synthetic CIFAR-like dataset, written in every supported source format (for tests and
smoke runs). Class c images are noise around a class-specific colour, so they are learnable."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_arrays(n_train: int = 200, n_test: int = 100, size: int = 32, seed: int = 0):
    """(train_x, train_y, test_x, test_y): uint8 (N,3,H,W), int64 labels, classes balanced."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(len(CLASSES), 3, 1, 1))

    def split(n):
        y = np.arange(n) % len(CLASSES)
        x = colours[y] + rng.normal(0, 30, size=(n, 3, size, size))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return (*split(n_train), *split(n_test))


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_folder(root: Path, arrays) -> Path:
    tx, ty, vx, vy = arrays
    for split, xs, ys in (("train", tx, ty), ("test", vx, vy)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            d = Path(root) / split / CLASSES[y]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.png").write_bytes(_png(x))
    return Path(root)


def write_image_zip(path: Path, arrays, top: str = "") -> Path:
    tx, ty, vx, vy = arrays
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split, xs, ys in (("train", tx, ty), ("test", vx, vy)):
            for i, (x, y) in enumerate(zip(xs, ys)):
                # a fixed timestamp: the same arrays give the same bytes, so the same dataset key
                zf.writestr(zipfile.ZipInfo(f"{top}{split}/{CLASSES[y]}/{i:04d}.png", date_time=_EPOCH), _png(x))
    return Path(path)


def _batches(arrays, n_batches: int = 5) -> dict[str, bytes]:
    tx, ty, vx, vy = arrays
    out = {"batches.meta": pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})}
    for b, part in enumerate(np.array_split(np.arange(len(ty)), n_batches), start=1):
        out[f"data_batch_{b}"] = pickle.dumps({b"data": tx[part].reshape(len(part), -1), b"labels": ty[part].tolist()})
    out["test_batch"] = pickle.dumps({b"data": vx.reshape(len(vy), -1), b"labels": vy.tolist()})
    return out


def write_cifar_folder(root: Path, arrays) -> Path:
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for name, blob in _batches(arrays).items():
        (d / name).write_bytes(blob)
    return d


def write_cifar_tar(path: Path, arrays) -> Path:
    """The official archive's layout; byte-identical for the same arrays (gzip and tar times 0)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tf:
        for name, blob in _batches(arrays).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return Path(path)


class FeatureArrays:
    """Synthetic data with a robust and a non-robust feature per class, both predictive:

    - the robust cue: a large class colour (per-image colour jitter of sd ``cue_jitter`` and pixel
      noise of sd ``noise``), the kind of feature a small perturbation cannot move;
    - the non-robust feature: a small per-class pattern, a random +-``amp`` 4x4 tile repeated over
      the image (L2 norm ``amp * sqrt(3 * H * W)``, 3.3 for 32x32 at amp 0.06).

    Clean images carry the cue and the pattern of their class. ``with_pattern(t)`` gives the
    training images with their pattern switched to class t (what an ideal targeted attack does),
    ``cue_only()`` the training images without any pattern. Values in [0, 1]; clean splits uint8.
    """

    def __init__(self, n_train: int, n_test: int, seed: int = 0, amp: float = 0.06, cue_jitter: float = 0.15,
                 noise: float = 0.03, size: int = 32):
        rng = np.random.default_rng(seed)
        c = len(CLASSES)
        self.colours = rng.uniform(0.2, 0.8, size=(c, 3, 1, 1))
        self.tiles = rng.choice([-amp, amp], size=(c, 3, 4, 4))
        self.size = size

        def cue(n):
            y = np.arange(n) % c
            return self.colours[y] + rng.normal(0, cue_jitter, (n, 3, 1, 1)) + rng.normal(0, noise, (n, 3, size, size)), y

        self._cue_train, self.train_y = cue(n_train)
        cue_test, self.test_y = cue(n_test)
        self.train_x = self._u8(self._cue_train + self._pattern(self.train_y))
        self.test_x = self._u8(cue_test + self._pattern(self.test_y))

    def _pattern(self, labels: np.ndarray) -> np.ndarray:
        reps = self.size // 4
        return np.tile(self.tiles[labels], (1, 1, reps, reps))

    @staticmethod
    def _u8(x: np.ndarray) -> np.ndarray:
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)

    def with_pattern(self, labels: np.ndarray) -> np.ndarray:
        return np.clip(self._cue_train + self._pattern(labels), 0, 1).astype(np.float16)

    def cue_only(self) -> np.ndarray:
        return np.clip(self._cue_train, 0, 1).astype(np.float16)


def feature_arrays(n_train: int = 1000, n_test: int = 500, seed: int = 0, **kw) -> FeatureArrays:
    return FeatureArrays(n_train, n_test, seed, **kw)
