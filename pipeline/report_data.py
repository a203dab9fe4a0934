"""What a run's report shows, read back from the store: nothing is recomputed except, for stores
written before evaluations kept a confusion matrix, a det student's test predictions.

A run folder (``runs/<key>/``) holds its table, ``config.yaml``, ``plan.json`` (every stage spec)
and a manifest; a sweep folder holds ``sweep.parquet`` and a manifest listing its points' runs.
Everything else (sets, models, evaluations) is found by key in the store around the folder.

A report records what it was drawn from in ``report.json`` beside it (``fingerprint``: the
folder's files above and the report's code); ``report_is_current`` says whether drawing it again
would draw the same report, so a rerun that changes nothing skips it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.kinds import kind as stage_kind
from storage import arrays as A
from storage.store import Store, StoreError, is_remote, open_root, read_json


@dataclass
class RunInfo:
    """One run (or sweep) folder and what the store says about it."""
    folder: Any
    key: str
    kind: str
    """The experiment whose run this is (its manifest says; '' for runs written before it did),
    or 'sweep'."""
    table: pd.DataFrame
    manifest: dict[str, Any]
    config_text: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    """plan.json: every stage spec (stage, key, config, inputs) in dependency order."""
    labels: dict[str, str] = field(default_factory=dict)

    def of(self, stage: str) -> list[dict[str, Any]]:
        return [s for s in self.stages if s["stage"] == stage]


def _read_parquet(path: Any) -> pd.DataFrame:
    with path.open("rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))


def resolve_run(store: Store | None, run: str) -> tuple[Store, Any]:
    """A run folder from a path (its store: two levels up, unless given) or a run key in ``store``."""
    path = open_root(run)
    if path.is_dir() and (path / "manifest.json").is_file():
        return (store or Store(path.parent.parent)), path
    if store is not None and store.is_complete("runs", run):
        return store, store.path("runs", run)
    where = f"the store at {store.root}" if store is not None else "this folder"
    raise StoreError(f"{run!r} is neither a finished run folder (runs/<key>/ with a manifest.json) nor a run key in "
                     f"{where}; give the folder that `advfeatures run` printed, or --store with a key")


def load_run(store: Store, folder: Any) -> RunInfo:
    man = read_json(folder / "manifest.json")
    config_text = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    if (folder / "sweep.parquet").is_file():
        return RunInfo(folder, man["key"], "sweep", _read_parquet(folder / "sweep.parquet"), man, config_text)
    if not (folder / "table.parquet").is_file():
        raise StoreError(f"{folder} holds no table.parquet or sweep.parquet: not a run folder")
    from pipeline.report import with_fooling

    table = with_fooling(store, _read_parquet(folder / "table.parquet"))  # tables of older runs: the new columns
    stages = read_json(folder / "plan.json") if (folder / "plan.json").is_file() else []
    labels = {**stage_labels(stages), **(man.get("labels") or {})}
    return RunInfo(folder, man["key"], man.get("experiment", ""), table, man, config_text, stages, labels)


def stage_labels(stages: list[dict[str, Any]]) -> dict[str, str]:
    """A readable name for every stage of a plan.json, from its kind (runs written before their
    manifest kept the plan's own labels)."""
    from pipeline.kinds import label

    out: dict[str, str] = {}
    for s in stages:
        out[s["key"]] = label(s, out)
    return out


def timings(store: Store, info: RunInfo) -> pd.DataFrame:
    """Per stage: seconds it took (from its manifest), when it was made, complete or not."""
    rows = []
    for s in info.stages:
        folder = stage_kind(s["stage"]).folder
        done = store.is_complete(folder, s["key"])
        man = store.manifest(folder, s["key"]) if done else {}
        rows.append({"stage": s["stage"], "what": info.labels.get(s["key"], ""), "key": s["key"],
                     "seconds": float(man.get("seconds", float("nan"))) if done else float("nan"),
                     "created": man.get("created", "")[:19].replace("T", " "), "complete": done})
    return pd.DataFrame(rows)


def histories(store: Store, info: RunInfo) -> dict[str, list[dict[str, Any]]]:
    """label -> per-epoch history (train_loss, train_acc) of every model and student of the run."""
    out = {}
    for s in info.of("model") + info.of("student"):
        if store.is_complete("models", s["key"]):
            out[info.labels[s["key"]]] = store.manifest("models", s["key"]).get("history", [])
    return out


def _builder(kind: str) -> Any:
    """The set builder of ``kind`` (``pipeline.sets``); None for a kind no builder of this code knows."""
    from advfeatures.config import ConfigError
    from pipeline.sets import builder

    try:
        return builder(kind)
    except ConfigError:
        return None


def perturbed_sets(info: RunInfo) -> list[dict[str, Any]]:
    """The run's sets whose images were perturbed (their builder says so), in plan order."""
    return [s for s in info.of("construct") if getattr(_builder(s["config"].get("kind", "")), "perturbed", False)]


def set_builders(info: RunInfo) -> list[Any]:
    """The builders of the run's sets, each once, in plan order."""
    found = (_builder(s["config"].get("kind", "")) for s in info.of("construct"))
    return list({id(b): b for b in found if b is not None}.values())


def set_records(store: Store, key: str) -> dict[str, np.ndarray]:
    """Per-row records of a constructed set: y_target, y_true, fooled, loss, norm."""
    return A.read_rows(store.path("constructed", key), names=("y_target", "y_true", "fooled", "loss", "norm"))


def example_rows(rec: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Up to ``n`` sorted row indices, one per true class while classes last (the first such row
    of each class, classes in order of first appearance), among the rows whose target differs
    from the true label and that fool the source if there are any (the interesting ones)."""
    differ, fooled = rec["y_target"] != rec["y_true"], rec["fooled"].astype(bool)
    pool = next((np.flatnonzero(m) for m in (differ & fooled, differ, np.ones_like(differ)) if m.any()),
                np.zeros(0, np.int64))
    _, first = np.unique(rec["y_true"][pool], return_index=True)
    picked = pool[np.sort(first)][:n]
    if len(picked) < n:  # fewer classes than examples: the next rows of the pool
        picked = np.concatenate([picked, np.setdiff1d(pool, picked)[:n - len(picked)]])
    return np.sort(picked)


def examples(store: Store, spec: dict[str, Any], n: int = 6) -> dict[str, Any] | None:
    """Clean image, stored (adversarial) image and perturbation of ``n`` rows of a perturbed set,
    with true and assigned labels; None when the set holds no clean-image index (a set imported whole)."""
    path = store.path("constructed", spec["key"])
    man = store.manifest("constructed", spec["key"])
    rec = set_records(store, spec["key"])
    rows = example_rows(rec, n)
    if len(rows) == 0:
        return None
    at = A.read_rows_at(path, rows, names=("x", "index"))  # one chunk read per example
    if (at["index"] < 0).any():
        return None
    dataset_key = _dataset_of(store, spec)
    set_rows = getattr(_builder(spec["config"]["kind"]), "rows", None)
    if spec["config"].get("augment_copies") and set_rows is not None:  # a copy's clean image is its crop + flip
        clean = _copies_clean(store, spec, dataset_key, rows, set_rows)
    else:
        idx = at["index"]
        uniq, inv = np.unique(idx, return_inverse=True)
        clean = A.read_images(store.path("datasets", dataset_key), "train", uniq)[inv]
    clean = clean.astype(np.float32) / 255.0  # (n, C, H, W) in [0, 1]
    adv = at["x"].astype(np.float32)
    return {"kind": spec["config"].get("kind"), "key": spec["key"], "clean": clean, "adv": adv, "delta": adv - clean,
            "y_true": rec["y_true"][rows], "y_target": rec["y_target"][rows], "fooled": rec["fooled"][rows],
            "norm": rec["norm"][rows], "classes": man.get("classes") or [str(i) for i in range(man["num_classes"])]}


def _copies_clean(store: Store, spec: dict[str, Any], dataset_key: str, rows: np.ndarray,
                  set_rows: Any) -> np.ndarray:
    """The clean images (uint8) of ``rows`` of a set built on augmented copies, each its image's crop
    and flip, the rows mapped to images by ``set_rows``, the set builder's (``SetBuilder.rows``)."""
    from advfeatures import construct as C
    from pipeline.common import dataset_info, train_images_at

    cfg = spec["config"]
    y_all = A.read_rows(store.path("datasets", dataset_key) / "train", names=("labels",))["labels"]
    num_classes = len(dataset_info(store, dataset_key)["classes"])
    idx, _, copy = set_rows(cfg, y_all, num_classes)
    return C.crop_flip(train_images_at(store, dataset_key, idx[rows]), C.copy_params(cfg["seed"], idx[rows], copy[rows]))


def _dataset_of(store: Store, spec: dict[str, Any]) -> str:
    """The dataset a constructed set's rows index: its first input, or its parent set's (a set
    made from another set, e.g. a poison from det)."""
    key = spec["inputs"][0]
    while not store.is_complete("datasets", key) and store.is_complete("constructed", key):
        key = store.manifest("constructed", key)["stage"]["inputs"][0]
    return key


def confusion(store: Store, info: RunInfo, set_name: str, device: str = "cpu"
              ) -> tuple[np.ndarray, list[str], int] | None:
    """Summed confusion counts (C, C) of the run's students of set ``set_name`` on the clean test
    set (rows: true label, columns: prediction), the class names and the number of students; None
    without such students. Read from the evaluations; computed from the model and the test set for
    evaluations stored before they kept it (one forward pass over the test set per student)."""
    students = [s for s in info.of("student") if s["config"].get("set") == set_name]
    evals = {s["inputs"][0]: s for s in info.of("eval") if "robust" not in s["config"]}
    total, classes, n = None, None, 0
    for st in students:
        ev = evals.get(st["key"])
        if ev is None or not store.is_complete("evals", ev["key"]):
            continue
        m = store.manifest("evals", ev["key"])["metrics"]
        ds = store.manifest("datasets", ev["inputs"][1])
        classes = ds["classes"]
        conf = m.get("confusion")
        if conf is None:
            conf = _confusion_now(store, st["key"], ev["inputs"][1], len(classes), device)
        conf = np.asarray(conf, dtype=np.int64)
        total = conf if total is None else total + conf
        n += 1
    return None if total is None else (total, classes, n)


def _confusion_now(store: Store, model_key: str, dataset_key: str, num_classes: int, device: str) -> list[list[int]]:
    import torch

    from advfeatures.training import confusion_matrix, predict
    from pipeline.common import load_model, load_split

    x, y = load_split(store, dataset_key, "test")
    pred = predict(load_model(store, model_key, device), torch.from_numpy(x), device=device)
    return confusion_matrix(pred, torch.from_numpy(y), num_classes)


def environment(store: Store, info: RunInfo) -> dict[str, Any]:
    """Versions, devices and runtime settings: the run's manifest, the devices its models were
    trained on (from their manifests), and the versions of this report's libraries."""
    from importlib import metadata

    man = info.manifest
    env = dict(man.get("environment") or {})
    devices = set()
    for s in info.of("model") + info.of("student"):
        if store.is_complete("models", s["key"]):
            e = store.manifest("models", s["key"]).get("environment") or {}
            devices.add(e.get("device_name") or e.get("device") or "?")
    report_libs = {}
    for lib in ("prefect", "matplotlib", "rich", "pandas", "zarr"):
        try:
            report_libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            report_libs[lib] = "not installed"
    return {"environment": env, "devices": sorted(devices), "runtime": man.get("runtime") or {},
            "code_version": man.get("code_version") or {}, "report_libraries": report_libs,
            "created": man.get("created", ""),
            "report_made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def sweep_points(info: RunInfo) -> list[dict[str, Any]]:
    return list(info.manifest.get("points") or [])


def put(path: Any, data: bytes) -> None:
    """Write a file of a (published) run folder: locally through a temporary file and a rename,
    on a URL store in one write."""
    if not is_remote(path):
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    else:
        path.write_bytes(data)


REPORT_RECORD = "report.json"
REPORT_INPUTS = ("manifest.json", "table.parquet", "sweep.parquet", "plan.json", "config.yaml")
"""The files of a run or sweep folder a report is drawn from (with the artifacts they name by key,
which never change under their key)."""


def report_code() -> list[Path]:
    """The modules that draw reports: the generic sections and figures, and every experiment's and
    set builder's (their own report sections and figures). A change to any of them draws reports again."""
    here = Path(__file__).resolve().parent
    return [here / f"{m}.py" for m in ("html_report", "figures", "report_data", "report")] + \
        sorted((here / "experiments").glob("*.py")) + sorted((here / "sets").glob("*.py"))


def report_fingerprint(folder: Any) -> str:
    """sha256 of the folder's ``REPORT_INPUTS`` (each one present, by name and bytes) and of the
    report's code (``report_code``)."""
    h = hashlib.sha256()
    for name in REPORT_INPUTS:
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode() + data)
    for path in report_code():
        data = path.read_bytes() if path.is_file() else b""
        h.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def report_record(folder: Any, files: list[str]) -> bytes:
    """``report.json``: the fingerprint of what the report was drawn from and the files it wrote."""
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"fingerprint": report_fingerprint(folder), "files": sorted(files), "made": made},
                      indent=1).encode()


def report_is_current(folder: Any) -> bool:
    """The folder's report was drawn from these same files by this same code, and every file it
    wrote is there: drawing it again would give the same report."""
    try:
        rec = read_json(folder / REPORT_RECORD)
    except (OSError, ValueError):  # none yet, or unreadable: draw it
        return False
    files = rec.get("files") or []
    return bool(files) and all((folder / f).is_file() for f in files) and \
        rec.get("fingerprint") == report_fingerprint(folder)
