"""dataset: a data source (zip, folder, CIFAR tarball, torchvision download) ingested as Zarr
arrays, keyed by the sha256 of the source's bytes.

The manifest also records where the source was and its size and mtime (``source_path``,
``source_size``, ``source_mtime_ns``; a folder's ``source_listing``): ``source_sha256(path, store)``
then returns the recorded sha256 instead of reading the source again while those are unchanged.
They are provenance, not part of the key (the stage's config is ``{"source_sha256": ...}`` alone).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from advfeatures import data as D
from advfeatures.config import ConfigError, DataConfig
from pipeline.common import Context, Log, once, publish, quiet, run_record
from pipeline.kinds import StageKind, StageSpec, declare
from storage import arrays as A
from storage.hashing import path_sha256, path_stat
from storage.store import MANIFEST, Store, read_json

STAT_FIELDS = ("source_path", "source_size", "source_mtime_ns", "source_listing")


def source_stat(path: str | os.PathLike) -> dict[str, Any]:
    """The source's resolved path, size and mtime (a folder's: also its listing), as the dataset
    manifest records them: ``source_path``, ``source_size``, ``source_mtime_ns``, ``source_listing``."""
    return {f"source_{k}": v for k, v in path_stat(path).items()}


def _dataset_manifests(store: Store) -> Iterator[dict[str, Any]]:
    folder = store.root / "datasets"
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith("."):  # staging folders
            continue
        try:
            yield read_json(entry / MANIFEST)
        except (OSError, ValueError):  # no manifest: not an artifact (yet)
            continue


# <store>/datasets/.source-stats.json: sources hashed again after their ingestion (touched, copied
# again, moved) whose bytes are a stored dataset's, by path, size and mtime (a folder: listing)
RESTATS = ".source-stats.json"


def _stat_id(stat: dict[str, Any]) -> str:
    return json.dumps([stat.get(k) for k in STAT_FIELDS])


def source_sha256(path: str | os.PathLike, store: Store | None = None) -> str:
    """The data source's fingerprint: sha256 of the file, or of a folder's (path, bytes) pairs.

    With ``store``, a dataset of it whose manifest recorded this source at the same path, size
    and mtime (a folder: the same listing) gives its sha256 without reading the source; a source
    moved, touched or rewritten since is hashed again, and where its bytes are still a stored
    dataset's (a copy, a touch) the new path, size and mtime are remembered beside the datasets
    (``RESTATS``), so that it is hashed once, not on every run. Without a store, it is always hashed."""
    if store is None:
        return path_sha256(path)
    stat = source_stat(path)
    want = {k: stat.get(k) for k in STAT_FIELDS}
    known = set()
    for man in _dataset_manifests(store):
        if man.get("source_sha256"):
            if {k: man.get(k) for k in STAT_FIELDS} == want:
                return man["source_sha256"]
            known.add(man["source_sha256"])
    restats = _read_restats(store)
    if restats.get(_stat_id(want)) in known:
        return restats[_stat_id(want)]
    sha = path_sha256(path)
    if sha in known and not store.remote and source_stat(path) == stat:  # unchanged while it was read
        kept = {k: v for k, v in restats.items() if v in known}  # none of a dataset since removed
        _write_restats(store, {**kept, _stat_id(want): sha})
    return sha


def _read_restats(store: Store) -> dict[str, str]:
    try:
        out = json.loads((store.root / "datasets" / RESTATS).read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _write_restats(store: Store, restats: dict[str, str]) -> None:
    """Atomically (a temporary file renamed over it); a store it cannot write to only loses the shortcut."""
    dest = store.root / "datasets" / RESTATS
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{RESTATS}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(restats, f, indent=1)
        os.replace(tmp, dest)  # a concurrent writer's entry may be lost: only its shortcut
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def locate_source(data: DataConfig) -> Path:
    """The local file or folder to ingest; downloads with torchvision when source='torchvision'."""
    if data.source == "torchvision":
        tgz = Path(data.download_root).expanduser() / "cifar-10-python.tar.gz"
        return tgz if tgz.is_file() else D.download_torchvision(data.download_root)
    path = D.locate(data.source)
    D.reader_for(path)  # fails early, with the expected layout, on an unsupported source
    return path


def check_source(data: DataConfig) -> list[str]:
    """Before any work: the source opens, both splits list the same classes, and one image per
    class decodes (``advfeatures.data.probe``); torchvision's copy is checked when downloaded.
    Returns the classes ([]: CIFAR-10's, not listed by the probe)."""
    if data.source == "torchvision":
        tgz = Path(data.download_root).expanduser() / "cifar-10-python.tar.gz"
        return D.probe(tgz) if tgz.is_file() else []
    return D.probe(locate_source(data))


def ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log = quiet) -> str:
    return once(lambda st, sp: _ingest(st, data, sp, log))(store, spec)


def _ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log) -> str:
    path = locate_source(data)
    t0 = time.perf_counter()
    stat = source_stat(path)
    raw = D.read_source(path)
    attrs = {"classes": raw.classes, "source_sha256": spec.config["source_sha256"],
             "content_sha256": raw.content_sha256(), "source_name": path.name}

    def write(tmp: Path) -> dict[str, Any]:
        A.write_dataset(tmp, {"train": (raw.train.images, raw.train.labels),
                              "test": (raw.test.images, raw.test.labels)}, attrs)
        return {}

    # The stat stands for the sha256 only if the bytes read are those the key was hashed from
    # (the source may have changed since the plan was made): one more read, once per dataset.
    same = path_sha256(path) == spec.config["source_sha256"] and source_stat(path) == stat
    publish(store, spec, t0, write, **attrs, **(stat if same else {}), **run_record(None),
            n_train=len(raw.train.labels), n_test=len(raw.test.labels), image_shape=list(raw.train.images.shape[1:]))
    log(f"ingested {path.name}: {len(raw.train.labels)} train / {len(raw.test.labels)} test images")
    return spec.key


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    if ctx.data is None:
        raise ConfigError("ingesting a dataset needs the data source (data.source) in the run context")
    return ingest(store, ctx.data, spec, ctx.log)


def verify(store: Store, key: str, man: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The arrays against the content sha256 in the manifest."""
    path = store.path("datasets", key)
    try:
        raw = D.RawDataset(*(D.Split(*A.read_split(path, s)) for s in ("train", "test")), man["classes"])
        if raw.content_sha256() != man["content_sha256"]:
            return ["dataset arrays do not match their content sha256"], []
    except Exception as e:  # noqa: BLE001 - undecodable chunks
        return [f"dataset arrays unreadable ({type(e).__name__}: {e})"], []
    return [], []


KIND = declare(StageKind("dataset", 1, "datasets", execute, "a data source ingested as Zarr arrays",
                         label=lambda spec, labels: "data", verify=verify, task_name="ingest",
                         summary=lambda man: f"{len(man.get('classes', []))} classes, source "
                                             f"{man['stage']['config'].get('source_sha256', '')[:8]}"))
