"""What the store holds (``advfeatures ls``) and removing what no run reaches (``advfeatures gc``).

An artifact is a folder ``<store>/<folder>/<key>/``; it is complete when its manifest exists.
A run reaches the keys in its ``plan.json`` (every stage of its plan), the inputs of those
artifacts' manifests, transitively (a margin selection's parent set), and itself; a sweep folder
reaches the runs of its points. ``gc`` keeps what the given runs (default: every run) reach and
removes the rest, skipping any artifact whose lock (the artifact's or one of its shards') is held
by a running stage, and anything younger than ``min_age_hours`` (a run in progress writes its
plan.json only at its end, so its finished stages are reached by no run until then).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.kinds import all_kinds, folders
from storage.store import MANIFEST, Store, StoreError, read_json


@dataclass
class Artifact:
    folder: str
    key: str
    path: Any
    complete: bool
    manifest: dict[str, Any]
    bytes: int
    mtime: float

    @property
    def stage(self) -> str:
        # unfinished (no manifest): the folder's first declared kind (an unfinished student shows as model)
        return self.manifest.get("stage", {}).get("stage") or \
            next(k.name for k in all_kinds().values() if k.folder == self.folder)

    @property
    def inputs(self) -> list[str]:
        return list(self.manifest.get("stage", {}).get("inputs", []))

    @property
    def created(self) -> str:
        c = self.manifest.get("created")
        return c[:16].replace("T", " ") if c else \
            _dt.datetime.fromtimestamp(self.mtime, _dt.timezone.utc).isoformat()[:16].replace("T", " ")


def _size(path: Any) -> tuple[int, float]:
    """Bytes under a local folder and its newest modification time."""
    total, newest = 0, os.stat(path).st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                s = os.stat(os.path.join(dirpath, f))
            except FileNotFoundError:  # removed while we walk (a writer's temporary file)
                continue
            total, newest = total + s.st_size, max(newest, s.st_mtime)
    return total, newest


def scan(store: Store) -> list[Artifact]:
    """Every artifact folder of a local store, complete or not (staging folders included, as
    incomplete artifacts named after their key)."""
    if store.remote:
        raise StoreError(f"ls/gc read local or mounted stores; {store.url} is a URL (list it with its own tools)")
    out = []
    for folder in folders():
        base = store.root / folder
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if not entry.is_dir():
                continue
            key = entry.name.split("-")[1] if entry.name.startswith(".staging-") else entry.name
            man = entry / MANIFEST
            try:
                manifest = read_json(man) if man.is_file() else {}
            except ValueError:
                manifest = {}
            size, mtime = _size(entry)
            out.append(Artifact(folder, key, entry, bool(manifest) and not entry.name.startswith("."), manifest,
                                size, mtime))
    return out


def summary(a: Artifact) -> str:
    """A few words on what an artifact is, from its manifest (its kind's ``summary``)."""
    if not a.manifest.get("stage", {}).get("config"):
        return "(no manifest: unfinished" + (", staging" if a.path.name.startswith(".") else "") + ")"
    k = all_kinds().get(a.stage)
    return k.summary(a.manifest) if k is not None and k.summary is not None else ""


def list_artifacts(store: Store, stage: str | None = None, incomplete: bool = False, key: str | None = None,
                   reach: set[str] | None = None) -> list[Artifact]:
    arts = scan(store)
    if stage:
        arts = [a for a in arts if a.stage == stage]
    if incomplete:
        arts = [a for a in arts if not a.complete]
    if key:
        arts = [a for a in arts if a.key.startswith(key)]
    if reach is not None:
        arts = [a for a in arts if a.key in reach]
    return arts


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def run_folders(store: Store, runs: list[str] | None = None) -> list[Any]:
    """The run folders named (paths or keys), or every complete run of the store."""
    if not runs:
        base = store.root / "runs"
        return [p for p in sorted(base.iterdir()) if (p / MANIFEST).is_file()] if base.is_dir() else []
    out = []
    for r in runs:
        p = Path(r).resolve() if os.path.isdir(r) else store.root / "runs" / r
        if not (p / MANIFEST).is_file():
            raise StoreError(f"{r!r} is not a finished run of the store at {store.root} (runs/<key>/manifest.json)")
        out.append(p)
    return out


def reachable(store: Store, runs: list[Any]) -> set[str]:
    """Every key the run folders reach: themselves, their plans' stages and, transitively, the
    inputs recorded in those artifacts' manifests (sweeps reach their points' runs)."""
    todo: list[str] = []
    for r in runs:
        todo.append(r.name)
        if (r / "plan.json").is_file():
            todo += [s["key"] for s in read_json(r / "plan.json")]
    by_key = {a.key: a for a in scan(store) if a.complete}
    seen: set[str] = set()
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        a = by_key.get(k)
        if a is None:
            continue
        todo += a.inputs
        if a.folder == "runs" and (a.path / "plan.json").is_file():
            todo += [s["key"] for s in read_json(a.path / "plan.json")]
    return seen


@contextmanager
def held_off(store: Store, a: Artifact) -> Iterator[bool]:
    """Take every lock of an artifact (its own and its shards') without waiting; yield False if
    any is held by someone else (a running stage), True with all of them held."""
    locks = store.root / ".locks"
    names = [f"{a.folder}-{a.key}.lock"]
    if locks.is_dir():
        names += [p.name for p in locks.glob(f"{a.folder}-{a.key}-shard*.lock")]
    with ExitStack() as stack:
        for name in names:
            if not (locks / name).is_file():
                continue
            f = stack.enter_context(open(locks / name, "a+"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield True


def collect(store: Store, runs: list[str] | None = None, min_age_hours: float = 1.0,
            delete: bool = False) -> list[dict[str, Any]]:
    """What gc removes (or, with ``delete``, removed): one row per artifact no given run reaches,
    with what happened to it: 'delete' / 'deleted', or why it is kept ('locked', 'recent')."""
    keep = reachable(store, run_folders(store, runs))
    now, out = time.time(), []
    for a in scan(store):
        if a.key in keep and a.complete:
            continue
        if a.key in keep and not a.path.name.startswith("."):
            continue  # an unfinished artifact of a kept run: the next run completes it
        row = {"folder": a.folder, "key": a.key, "stage": a.stage, "what": summary(a), "bytes": a.bytes,
               "created": a.created, "complete": a.complete}
        if now - a.mtime < min_age_hours * 3600:
            out.append({**row, "action": "kept: recent"})
            continue
        with held_off(store, a) as free:
            if not free:
                out.append({**row, "action": "kept: locked by a running stage"})
                continue
            if delete:
                shutil.rmtree(a.path)
            out.append({**row, "action": "deleted" if delete else "delete"})
    return out
