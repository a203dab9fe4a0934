"""Configuration hashing: the cache key of every stage.

key = sha256(canonical_json({"stage", "schema", "config", "inputs"}))[:16]

Canonical JSON: sorted keys, no whitespace, no NaN/inf, floats in Python's shortest round-trip
repr, tuples as lists. Nothing process-dependent (no ``hash()``, no ids) enters the key, so a key
is the same in every process and on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

KEY_LENGTH = 16


class HashingError(ValueError):
    """A value cannot be put into a cache key."""


def _plain(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise HashingError(f"{where}: mapping keys must be strings, got {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HashingError(f"{where}: {value!r} is not a finite number; configs must be finite")
        return value
    if isinstance(value, Sequence):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise HashingError(f"{where}: cannot hash a {type(value).__name__}; use plain JSON values")


def canonical_json(value: Any) -> str:
    """Deterministic JSON text of ``value`` (dataclasses, mappings, sequences, scalars)."""
    return json.dumps(_plain(value, "config"), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stage_key(stage: str, schema: int, config: Any, inputs: Sequence[str] = ()) -> str:
    """Cache key of a stage: its name, schema version, own config and upstream keys (in order)."""
    payload = {"stage": stage, "schema": int(schema), "config": config, "inputs": list(inputs)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def path_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a directory's sorted (relative path, bytes) pairs.
    Also takes a file on an fsspec path (a ``UPath`` of a URL store)."""
    h = hashlib.sha256()
    if not isinstance(path, (str, os.PathLike)):  # fsspec path: files only
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            h.update(str(p.relative_to(path).as_posix()).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def path_stat(path: str | os.PathLike) -> dict[str, Any]:
    """What says, without reading a byte, whether a local file or folder changed since it was
    hashed: its resolved path, size (bytes) and mtime (ns since the epoch); for a folder, the total
    size, the newest file's mtime and ``listing``, the sha256 of every file's (relative path, size,
    mtime_ns), the files ``path_sha256`` reads: adding, removing, renaming or rewriting one changes it."""
    path = Path(path).resolve()
    st = path.stat()
    if not path.is_dir():
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h, size, newest = hashlib.sha256(), 0, 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            f = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{f.st_size}\0{f.st_mtime_ns}\n".encode())
            size, newest = size + f.st_size, max(newest, f.st_mtime_ns)
    return {"path": str(path), "size": size, "mtime_ns": newest, "listing": h.hexdigest()}
