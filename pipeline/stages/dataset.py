"""dataset: a data source (zip, folder, CIFAR tarball, torchvision download) ingested as Zarr
arrays, keyed by the sha256 of the source's bytes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from advfeatures import data as D
from advfeatures.config import ConfigError, DataConfig
from pipeline.common import Context, Log, once, publish, quiet, run_record
from pipeline.kinds import StageKind, StageSpec, declare
from storage import arrays as A
from storage.hashing import path_sha256
from storage.store import Store


def source_sha256(path: str | os.PathLike) -> str:
    """The data source's fingerprint: sha256 of the file, or of a folder's (path, bytes) pairs."""
    return path_sha256(path)


def locate_source(data: DataConfig) -> Path:
    """The local file or folder to ingest; downloads with torchvision when source='torchvision'."""
    if data.source == "torchvision":
        tgz = Path(data.download_root).expanduser() / "cifar-10-python.tar.gz"
        return tgz if tgz.is_file() else D.download_torchvision(data.download_root)
    path = D.locate(data.source)
    D.reader_for(path)  # fails early, with the expected layout, on an unsupported source
    return path


def ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log = quiet) -> str:
    return once(lambda st, sp: _ingest(st, data, sp, log))(store, spec)


def _ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log) -> str:
    path = locate_source(data)
    t0 = time.perf_counter()
    raw = D.read_source(path)
    attrs = {"classes": raw.classes, "source_sha256": spec.config["source_sha256"],
             "content_sha256": raw.content_sha256(), "source_name": path.name}

    def write(tmp: Path) -> dict[str, Any]:
        A.write_dataset(tmp, {"train": (raw.train.images, raw.train.labels),
                              "test": (raw.test.images, raw.test.labels)}, attrs)
        return {}

    publish(store, spec, t0, write, **attrs, **run_record(None), n_train=len(raw.train.labels),
            n_test=len(raw.test.labels), image_shape=list(raw.train.images.shape[1:]))
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
                         label=lambda spec, labels: "data", verify=verify, task_name="ingest"))
