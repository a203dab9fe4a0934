"""The artifact store: one root folder, one sub-folder per artifact kind, one folder per key.

    <root>/<kind>/<key>/manifest.json     written last and atomically: the artifact is complete
                                          exactly when its manifest exists
    <root>/<kind>/.staging-<key>-<uuid>/  where whole-folder artifacts are built before a rename

Readers trust manifests only. Every manifest records the stage's config, its inputs, the schema,
the code version, the seeds and the time it took.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """The store cannot be used (unwritable, inconsistent); the message names the fix."""


class IntegrityError(StoreError):
    """A stored artifact no longer matches the checksums recorded when it was written."""


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit and whether it is dirty."""
    from advfeatures import __version__

    out: dict[str, Any] = {"package": __version__}
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0:
            out["git"] = sha.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            out["dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def is_complete(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / MANIFEST).is_file()

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        p = self.path(kind, key) / MANIFEST
        if not p.is_file():
            raise StoreError(f"{kind}/{key} is not in the store at {self.root} (no {MANIFEST}); "
                             "run the stage that produces it first")
        return read_json(p)

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"the store root {self.root} is not writable ({e.strerror or e}); "
                             "set runtime.store (or --store) to a writable folder") from None

    def manifest_body(self, kind: str, key: str, stage: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "key": key, "stage": stage, "code_version": code_version(),
                "created": now_iso(), **extra}

    def write_manifest(self, kind: str, key: str, body: dict[str, Any]) -> None:
        atomic_write_json(self.path(kind, key) / MANIFEST, body)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive POSIX lock (flock) on one artifact, for processes on one host or on a shared
        filesystem with POSIX locks. A stage takes it, re-checks completeness, then computes: two
        runs reaching the same stage at once compute it once, the second waiting and reusing it."""
        d = self.root / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{kind}-{key}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def once(self, kind: str, key: str, done: Callable[[], bool], compute: Callable[[], T],
             skipped: T) -> T:
        """``compute()`` unless ``done()``; under the lock for (kind, key), re-checking ``done()``
        after acquiring it, so concurrent runs compute once and the others return ``skipped``."""
        if done():
            return skipped
        with self.lock(kind, key):
            return skipped if done() else compute()

    @contextlib.contextmanager
    def staging(self, kind: str, key: str) -> Iterator[Path]:
        """Build a whole-folder artifact in a staging folder; on success it is renamed into place.

        The caller writes its files and finally ``MANIFEST`` into the yielded folder. On any error
        the staging folder is removed, so no half-written artifact is ever visible.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".staging-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise StoreError(f"internal: staged {kind}/{key} has no {MANIFEST}")
            if final.exists():
                if (final / MANIFEST).is_file():  # another writer finished first: keep theirs
                    shutil.rmtree(tmp)
                    return
                shutil.rmtree(final)  # leftovers without a manifest are garbage
            try:
                os.replace(tmp, final)
            except OSError as e:  # another writer published between our check and our rename
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / MANIFEST).is_file():
                    shutil.rmtree(tmp)
                    return
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
