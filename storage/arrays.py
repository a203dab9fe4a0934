"""Zarr layouts (declared once) and the shard protocol for constructed datasets.

Dataset group ``datasets/<key>/``::

    train/images (N,3,H,W) uint8   train/labels (N,) int64
    test/images  (M,3,H,W) uint8   test/labels  (M,) int64
    attrs: classes, source_sha256, content_sha256

Constructed group ``constructed/<key>/``::

    x (N,3,H,W) float16|float32|uint8   y_target, y_true, index (N,) int64
    fooled (N,) bool   loss (N,) float32   norm (N,) float32   margin (N,) float32
    <extra> (N,)       fields a set kind adds (e.g. an inversion's goal index), declared in its
                       layout (``Layout.extra``) and recorded in the group's attrs
    _shards/<i>.json   completion marker of shard i: rows, count, sha256 of its rows, seconds,
                       the host and pid that wrote it

Shard protocol (parallel workers need no locks): shard i owns rows [i*S, min((i+1)*S, N)); S is a
multiple of the chunk length, so no two shards share a Zarr chunk. A worker skips shard i if its
marker exists; else it computes, writes its rows (one assignment per array), and writes the
marker atomically, last. A killed worker leaves no marker and its shard is redone whole.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from storage.store import StoreError, atomic_write_json, open_root, read_json

CONSTRUCTED_FIELDS: dict[str, str] = {  # name -> dtype (x's dtype is chosen per set)
    "y_target": "int64", "y_true": "int64", "index": "int64",
    "fooled": "bool", "loss": "float32", "norm": "float32", "margin": "float32",
}
SHARDS_DIR = "_shards"


def _group(path: Path, mode: str) -> zarr.Group:
    """The Zarr group at ``path``, as Zarr format 3 (the only one this project writes). Opened
    without a format, Zarr first looks for format 2's ``.zmetadata``, ``.zgroup`` and ``.zattrs``:
    on an object store each is a HEAD and a LIST that find nothing (6 of the 9 requests of every
    open, measured against moto)."""
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


# --- datasets --------------------------------------------------------------------------------------

def write_dataset(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], attrs: dict,
                  chunk: int = 1024) -> None:
    g = _group(path, mode="w")
    for name, (images, labels) in splits.items():
        sg = g.create_group(name)
        sg.create_array("images", data=np.ascontiguousarray(images, dtype=np.uint8),
                        chunks=(min(chunk, max(1, len(images))), *images.shape[1:]))
        sg.create_array("labels", data=np.ascontiguousarray(labels, dtype=np.int64),
                        chunks=(min(chunk, max(1, len(labels))),))
    g.attrs.update(attrs)


def read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    g = _group(path, mode="r")
    return g[f"{split}/images"][:], g[f"{split}/labels"][:]


def read_images(path: Path, split: str, idx: np.ndarray) -> np.ndarray:
    """Images at sorted indices ``idx`` of a split, reading only the chunks that hold them."""
    return _group(path, mode="r")[f"{split}/images"].oindex[idx]


def dataset_attrs(path: Path) -> dict:
    return dict(_group(path, mode="r").attrs)


# --- constructed datasets ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    n: int
    image_shape: tuple[int, ...]  # (C, H, W)
    x_dtype: str
    chunk: int
    shard_size: int
    extra: tuple[tuple[str, str], ...] = ()
    """(name, dtype) of per-row fields beyond ``CONSTRUCTED_FIELDS`` (a set kind's own records)."""

    def __post_init__(self):
        clash = sorted({n for n, _ in self.extra} & {"x", *CONSTRUCTED_FIELDS})
        if clash:
            raise ValueError(f"extra fields {clash} would replace a constructed set's own fields")
        if self.shard_size % self.chunk:
            raise ValueError(f"shard_size {self.shard_size} is not a multiple of chunk {self.chunk}")

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.n // self.shard_size))

    def rows(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        return i * self.shard_size, min((i + 1) * self.shard_size, self.n)

    def dtypes(self) -> dict[str, str]:
        return {"x": self.x_dtype, **CONSTRUCTED_FIELDS, **dict(self.extra)}

    def attrs(self, chunk: int | None = None) -> dict:
        """The layout as recorded in attrs and manifests (``extra`` only when there is any, so the
        records of sets without extra fields stay as they were)."""
        out = {"n": self.n, "image_shape": list(self.image_shape), "x_dtype": self.x_dtype,
               "chunk": self.chunk if chunk is None else chunk,
               "shard_size": self.shard_size}
        if self.extra:
            out["extra"] = [list(e) for e in self.extra]
        return out


def create_constructed(path: Path, layout: Layout) -> None:
    """Create the arrays of a constructed set, or check that existing ones match ``layout``.

    Idempotent: many workers may call it; only missing arrays are created.
    """
    try:
        g = _group(path, mode="a")
    except OSError as e:
        raise StoreError(f"cannot create {path} ({e}); check that the store is writable") from None
    chunk = min(layout.chunk, max(1, layout.n))
    for name, dtype in layout.dtypes().items():
        shape = (layout.n, *layout.image_shape) if name == "x" else (layout.n,)
        if name in g:
            a = g[name]
            if tuple(a.shape) != shape or str(a.dtype) != dtype or a.chunks[0] != chunk:
                raise StoreError(f"{path}/{name} exists with shape {a.shape}, dtype {a.dtype}, chunks "
                                 f"{a.chunks}; expected {shape}, {dtype}, {chunk}. Delete {path} to rebuild it")
            continue
        g.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]),
                       fill_value=0)
    g.attrs.update({"layout": layout.attrs(chunk)})
    (open_root(path) / SHARDS_DIR).mkdir(exist_ok=True)


def stored_layout(path: Path) -> Layout | None:
    """The layout a constructed set's arrays were created with, or None if they do not exist yet."""
    if not (open_root(path) / "zarr.json").is_file():
        return None
    lay = _group(path, mode="r").attrs.get("layout")
    if lay is None:
        return None
    return Layout(n=lay["n"], image_shape=tuple(lay["image_shape"]), x_dtype=lay["x_dtype"], chunk=lay["chunk"],
                  shard_size=lay["shard_size"], extra=tuple(tuple(e) for e in lay.get("extra", ())))


def marker_path(path: Path, i: int) -> Path:
    return open_root(path) / SHARDS_DIR / f"{i:05d}.json"


def shard_done(path: Path, i: int) -> bool:
    return marker_path(path, i).is_file()


def pending_shards(path: Path, layout: Layout) -> list[int]:
    return [i for i in range(layout.num_shards) if not shard_done(path, i)]


def rows_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Checksum of a shard's rows: every array, in name order, as little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + repr(a.shape).encode())
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def write_shard(path: Path, layout: Layout, i: int, arrays: dict[str, np.ndarray], seconds: float,
                meta: dict | None = None, **timings: float) -> dict:
    """Write shard i's rows (one assignment per array), then its marker. Returns the marker.
    ``timings`` (e.g. attack_seconds) and ``meta`` (runtime settings, versions) are recorded in it."""
    start, stop = layout.rows(i)
    want = layout.dtypes()
    if set(arrays) != set(want):
        raise ValueError(f"shard arrays {sorted(arrays)} differ from the layout's {sorted(want)}")
    g = _group(path, mode="r+")
    cast = {}
    for name, a in arrays.items():
        if a.shape[0] != stop - start:
            raise ValueError(f"shard {i}: {name} has {a.shape[0]} rows, expected {stop - start}")
        cast[name] = np.ascontiguousarray(a, dtype=want[name])
        g[name][start:stop] = cast[name]
    marker = {"shard": i, "start": start, "stop": stop, "count": stop - start,
              "sha256": rows_sha256(cast), "seconds": round(seconds, 3), "written": time.time(),
              "host": socket.gethostname(), "pid": os.getpid(),
              **{k: round(v, 3) for k, v in timings.items()}, **(meta or {})}
    atomic_write_json(marker_path(path, i), marker)
    return marker


def remove_partial_markers(path: Path) -> int:
    """Delete the half-written markers (``.NAME.tmp``, ``atomic_write_json``'s temporary files)
    that a writer killed while writing its marker left beside the markers; the number removed.
    Called before a finished set's manifest, so that no stale file stays in the set."""
    d, n = open_root(path) / SHARDS_DIR, 0
    for f in d.iterdir():
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            f.unlink()
            n += 1
    return n


def read_markers(path: Path, layout: Layout) -> list[dict]:
    missing = pending_shards(path, layout)
    if missing:
        raise StoreError(f"{path}: shards {missing[:10]} are not finished; rerun generation")
    markers = [read_json(marker_path(path, i)) for i in range(layout.num_shards)]
    total = sum(m["count"] for m in markers)
    if total != layout.n:
        raise StoreError(f"{path}: shard markers cover {total} rows, expected {layout.n}")
    return markers


def verify_shards(path: Path, markers: list[dict]) -> list[dict]:
    """Re-read every shard's rows and compare them with the checksum in its marker.

    Returns one problem per bad shard ({"shard", "start", "stop", "problem"}): unreadable chunks
    (truncated, undecodable) or rows that no longer hash to what the worker wrote.
    """
    problems = []
    for m in markers:
        try:
            rows = read_rows(path, m["start"], m["stop"])
        except Exception as e:  # noqa: BLE001 - any decode failure of a chunk means corruption
            problems.append({**_where(m), "problem": f"unreadable ({type(e).__name__}: {e})"})
            continue
        if rows_sha256(rows) != m["sha256"]:
            problems.append({**_where(m), "problem": "checksum mismatch"})
    return problems


def _where(m: dict) -> dict:
    return {"shard": m["shard"], "start": m["start"], "stop": m["stop"]}


def read_rows(path: Path, start: int = 0, stop: int | None = None,
              names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the named arrays (default: every array of a constructed set, its
    layout's extra fields included)."""
    g = _group(path, mode="r")
    if names is None:
        extra = (g.attrs.get("layout") or {}).get("extra", ())
        names = ("x", *CONSTRUCTED_FIELDS, *(name for name, _ in extra))
    return {n: g[n][start:stop] for n in names}


def read_rows_at(path: Path, idx: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows at sorted indices ``idx`` of the named arrays, reading only the chunks that hold them."""
    g = _group(path, mode="r")
    return {n: g[n].oindex[np.asarray(idx)] for n in names}
