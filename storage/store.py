"""The artifact store: one root folder, one sub-folder per artifact kind, one folder per key.

    <root>/<kind>/<key>/manifest.json     written last and atomically: the artifact is complete
                                          exactly when its manifest exists
    <root>/<kind>/.staging-<key>-<uuid>/  where whole-folder artifacts are built before a rename
                                          (a killed writer's is swept by a later write of its kind)

Readers trust manifests only. Every manifest records the stage's config, its inputs, the schema,
the code version, the seeds and the time it took.

The root is a local path (or a mounted volume: NFS, a Docker volume) or any fsspec URL
(``s3://bucket/prefix``, ``gs://...``, ``file:///abs/path``), opened with universal_pathlib; the
filesystem's options come from fsspec's configuration (e.g. ``FSSPEC_S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``). A URL root has no rename and no POSIX locks, so there:

- whole-folder artifacts are written in place, manifest last (one PUT, atomic on object stores);
  leftovers of a crashed writer carry no manifest and are deleted before the next write;
- the per-artifact lock is the one installed with ``Store.use_remote_lock`` (the Prefect tasks
  install a Prefect global concurrency limit of 1 per artifact, leased, so it is shared by every
  worker of one Prefect server and released when its holder dies).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path, PurePath
from typing import Any, ClassVar, TypeVar

from filelock import FileLock

from storage.version import code_version

T = TypeVar("T")

MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """The store cannot be used (unwritable, inconsistent); the message names the fix."""


class IntegrityError(StoreError):
    """A stored artifact no longer matches the checksums recorded when it was written."""


def open_root(root: Any) -> Path:
    """A local ``Path`` for a plain path; a ``UPath`` (pathlib-like, over fsspec) for a URL."""
    if isinstance(root, Path) or (not isinstance(root, str) and hasattr(root, "fs")):
        return root if not isinstance(root, Path) else root.expanduser().resolve()
    text = os.fspath(root)
    if "://" in text:
        try:
            from upath import UPath
        except ImportError:  # pragma: no cover - a dependency
            raise StoreError(f"store {text!r} is a URL: install universal_pathlib (and the fsspec "
                             "backend of its protocol, e.g. s3fs)") from None
        if text.startswith(("file://", "local://")):  # object stores have no folders; files do
            import fsspec.config

            fsspec.config.conf.setdefault("file", {}).setdefault("auto_mkdir", True)
        try:
            return UPath(text)
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open store {text!r}: {e}; install the fsspec backend for its "
                             "protocol (s3fs for s3://, gcsfs for gs://)") from None
    return Path(text).expanduser().resolve()


def is_remote(path: Any) -> bool:
    """True for fsspec paths (URL roots, ``file://`` included: it is how the URL code path is
    tested across processes), False for plain local paths (``str``, ``pathlib``)."""
    return not isinstance(path, (str, PurePath))


def _rm_remote(path: Any) -> None:
    """Delete a folder of an fsspec path, if it exists (local folders use shutil.rmtree)."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: locally to a temporary file in the same folder, fsync, then rename
    over ``path``; on an fsspec path with one write (a single PUT on object stores)."""
    if is_remote(path):
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
        if path.protocol in ("file", "local"):  # a real filesystem: write aside, then rename
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(text)
            path.fs.mv(tmp.path, path.path)
        else:
            path.write_text(text)  # one PUT: atomic on object stores
        return
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
    return json.loads((path if is_remote(path) else Path(path)).read_text())


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


STAGING_LEASE_SECONDS = 6 * 3600.0
"""A staging folder nobody has written to for this long belongs to a dead writer (SIGKILL, lost
host): a live writer adds files to it as it goes, and no stage writes for hours without a file."""


def _last_write(folder: Path) -> float:
    """The newest mtime of a folder and everything in it (seconds since the epoch)."""
    newest = folder.stat().st_mtime
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
        with contextlib.suppress(OSError):
            newest = max(newest, os.stat(dirpath).st_mtime)
    return newest


def sweep_staging(kind_folder: Path, lease: float | None = None, now: float | None = None) -> list[Path]:
    """Delete the ``.staging-*`` folders of one kind that no writer has touched for ``lease``
    seconds (default ``STAGING_LEASE_SECONDS``): leftovers of killed writers, which no reader
    trusts (no manifest) but which hold disk space. Called before every local staging write."""
    lease = STAGING_LEASE_SECONDS if lease is None else lease
    now = time.time() if now is None else now
    gone = []
    for d in kind_folder.glob(".staging-*"):
        try:
            if d.is_dir() and now - _last_write(d) > lease:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
        except OSError:  # another writer swept or published it meanwhile
            continue
    return gone


class Store:
    remote_lock: ClassVar[Callable[[str], AbstractContextManager[Any]] | None] = None
    """Lock factory for URL stores (name -> context manager); see ``use_remote_lock``."""

    def __init__(self, root: str | os.PathLike):
        self.root = open_root(root)
        self.remote = is_remote(self.root)

    @classmethod
    def use_remote_lock(cls, factory: Callable[[str], AbstractContextManager[Any]] | None) -> None:
        """Install the cross-host lock used by stores at URLs (one per process)."""
        cls.remote_lock = factory

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def url(self) -> str:
        """The root as one string other processes can open (a path or a URL)."""
        return str(self.root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def is_complete(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / MANIFEST).is_file()

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        p = self.path(kind, key) / MANIFEST
        try:  # read at once: on a URL store, asking first took another request (HEAD)
            return read_json(p)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"{kind}/{key} is not in the store at {self.root} (no {MANIFEST}); "
                             "run the stage that produces it first") from None

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"the store root {self.root} is not writable ({e.strerror or e}); "
                             "set runtime.store (or --store) to a writable folder or URL") from None
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own errors (auth, no bucket)
            raise StoreError(f"the store root {self.root} cannot be written ({type(e).__name__}: {e}); "
                             "check its URL and credentials (fsspec configuration)") from None

    def manifest_body(self, kind: str, key: str, stage: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"kind": kind, "key": key, "stage": stage, "code_version": code_version(),
                "created": now_iso(), **extra}

    def write_manifest(self, kind: str, key: str, body: dict[str, Any]) -> None:
        atomic_write_json(self.path(kind, key) / MANIFEST, body)

    @contextlib.contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive POSIX lock (flock) on one artifact, for processes on one host or on a shared
        filesystem with POSIX locks. A stage takes it, re-checks completeness, then computes: two
        runs reaching the same stage at once compute it once, the second waiting and reusing it.
        A URL store uses the installed ``remote_lock`` instead."""
        if self.remote:
            if Store.remote_lock is None:
                raise StoreError(f"the store {self.root} is a URL and needs a cross-host lock: run it through "
                                 "advfeatures' Prefect flows (which install one), or Store.use_remote_lock(...)")
            with Store.remote_lock(f"{kind}-{key}"):
                yield
            return
        d = self.root / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        # flock underneath (filelock's Unix lock): each call opens its own descriptor, so one holder
        # across processes and threads; the kernel releases it when the holder dies, SIGKILL included.
        # No soft (marker file) fallback where flock is missing: such a lock would outlive a killed
        # holder and `gc` (pipeline.inventory.held_off, flock) would not see it. Taking a lock this
        # thread already holds raises RuntimeError (filelock's deadlock check) instead of hanging.
        with FileLock(d / f"{kind}-{key}.lock", fallback_to_soft=False):
            yield

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
        the staging folder is removed, so no half-written artifact is ever visible. On a URL store
        the folder is the final one (no rename there): the manifest, written last, publishes it, and
        the caller holds the artifact's lock (``once``), so no other writer is in it.
        """
        final = self.path(kind, key)
        if self.remote:
            if (final / MANIFEST).is_file():
                raise StoreError(f"internal: {kind}/{key} is already published")
            _rm_remote(final)  # a crashed writer's leftovers (no manifest)
            final.mkdir(parents=True, exist_ok=True)
            try:
                yield final
                if not (final / MANIFEST).is_file():
                    raise StoreError(f"internal: staged {kind}/{key} has no {MANIFEST}")
            except BaseException:
                (final / MANIFEST).unlink(missing_ok=True)
                _rm_remote(final)
                raise
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_staging(final.parent)
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
