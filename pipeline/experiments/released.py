"""released: students of the datasets the paper's authors released (``drand_CIFAR``,
``ddet_CIFAR``, ``robust_CIFAR``, ``non_robust_CIFAR``), imported into our constructed-set layout
and keyed by the sha256 of their files, then trained and evaluated on the clean test set of our
dataset exactly like the sets we construct.

Each folder holds ``CIFAR_ims`` and ``CIFAR_lab``: torch-saved lists of tensors, concatenated
along the first axis (images (N, 3, 32, 32) float in [0, 1]; labels (N,) int). The true labels
of the images are not part of the release: ``y_true`` and ``index`` are -1 and the attack records
are NaN."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeatures.config import ConfigError, ExperimentConfig, _check
from pipeline.common import Context, dataset_info, once, run_record, save_set
from pipeline.experiments import Experiment, Probes, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_students, dataset_spec
from pipeline.sets import SetBuilder
from pipeline.sets import register as register_set
from storage.hashing import path_sha256
from storage.store import Store, StoreError

FILES = ("CIFAR_ims", "CIFAR_lab")


@dataclass(frozen=True)
class ReleasedConfig:
    root: str = ""
    """The released-sets experiment: a folder holding the paper's released datasets, each a
    subfolder with ``CIFAR_ims`` and ``CIFAR_lab`` (torch-saved lists of tensors, loaded by
    concatenation; images float in [0, 1])."""
    sets: tuple[str, ...] = ("drand_CIFAR", "ddet_CIFAR", "robust_CIFAR", "non_robust_CIFAR")
    """Subfolders of ``root`` to import; a missing one is an error naming it."""

    def __post_init__(self):
        _check(len(self.sets) >= 1 and len(set(self.sets)) == len(self.sets),
               "released.sets needs at least one folder name, without repeats")


def released_folder(cfg: ExperimentConfig, name: str) -> Path:
    root = Path(cfg.released.root).expanduser()
    if not cfg.released.root or not root.is_dir():
        raise ConfigError(f"released.root={cfg.released.root!r} is not a folder; set it to the folder holding "
                          f"{list(cfg.released.sets)} (each with {' and '.join(FILES)})")
    folder = root / name
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"released set {folder} lacks {missing}; it needs {' and '.join(FILES)} "
                          "(torch-saved lists of tensors), or drop it from released.sets")
    return folder


def released_spec(cfg: ExperimentConfig, name: str, dataset_key: str) -> StageSpec:
    """Keyed by content (the files' sha256), not by where they lie."""
    folder = released_folder(cfg, name)
    return StageSpec("construct", {"kind": "released", "name": name,
                                   "sha256": {f: path_sha256(folder / f) for f in FILES}, "dtype": cfg.construct.dtype},
                     (dataset_key,), options={"path": str(folder)})


@once
def import_released(store: Store, spec: StageSpec, rt=None, log=lambda _m: None) -> str:
    """A released dataset (``CIFAR_ims``/``CIFAR_lab``: torch-saved lists of tensors, concatenated)
    as a constructed set, after checking the files still have the sha256 in the key and that the
    images and labels fit the dataset (shape, [0, 1], classes)."""
    (dataset_key,) = spec.inputs
    folder = Path(spec.options.get("path", ""))
    t0 = time.perf_counter()
    for name, sha in spec.config["sha256"].items():
        if not (folder / name).is_file() or path_sha256(folder / name) != sha:
            raise StoreError(f"{folder / name} is missing or changed since the plan was made (its sha256 is in "
                             f"the key); rerun to plan with the files as they are now")
    info = dataset_info(store, dataset_key)

    def load(name: str) -> torch.Tensor:
        items = torch.load(folder / name, map_location="cpu", weights_only=True)
        return torch.cat(list(items)) if isinstance(items, (list, tuple)) else items

    x, y = load("CIFAR_ims").float(), load("CIFAR_lab").long().reshape(-1)
    where = f"released set {folder}"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(info["image_shape"]) or len(x) != len(y):
        raise StoreError(f"{where}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not fit the dataset's "
                         f"(N, {', '.join(map(str, info['image_shape']))}) images with N labels")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise StoreError(f"{where}: images must be floats in [0, 1], "
                         f"found [{float(x.min()):.3f}, {float(x.max()):.3f}]")
    if int(y.min()) < 0 or int(y.max()) >= len(info["classes"]):
        raise StoreError(f"{where}: labels must be 0..{len(info['classes']) - 1}, found {int(y.min())}..{int(y.max())}")
    n = len(y)
    nan = np.full(n, np.nan, np.float32)
    rows = {"x": x.to(getattr(torch, spec.config["dtype"])).numpy(), "y_target": y.numpy(),
            "y_true": np.full(n, -1, np.int64), "index": np.full(n, -1, np.int64), "fooled": np.zeros(n, bool),
            "loss": nan, "norm": nan, "margin": nan}
    summary = {"n": n, "attack_success": float("nan"), "attack_success_t_ne_y": float("nan"),
               "share_target_is_true": float("nan"), "released": spec.config["name"]}
    save_set(store, spec, rows, info["classes"], summary, run_record(rt), t0, source_folder=str(folder),
             records_note="released set: true labels and attack records are not part of the release")
    log(f"imported released set {spec.config['name']}: {n} rows")
    return spec.key



def _build(store: Store, spec: StageSpec, ctx: Context) -> str:
    return import_released(store, spec, ctx.runtime, ctx.log)


register_set(SetBuilder(("released",), "a dataset the paper's authors released, imported by content",
                        build=_build, plannable=False, task_name="import-released"))


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    out = Plan()
    ds = out.add(dataset_spec(source_sha256), "data", role="dataset")
    for name in cfg.released.sets:
        out.add(released_spec(cfg, name, ds.key), f"released {name}", role="set", set=name)
    for name in cfg.released.sets:
        add_students(out, cfg, name, out.get(role="set", set=name), ds, None, robust=False)
    return out.with_run(cfg.name)


def build_table(store: Any, plan: Plan) -> Any:
    import pandas as pd

    from pipeline.report import _row

    return pd.DataFrame([_row(store, s.kind, s.student, s.eval, store.manifest("constructed", s.construct.key), None)
                         for s in plan.students])


def probe_folder(root: Path) -> dict[str, Any]:
    """For docs/settings.md: the released sets' folders in ``root`` with made-up bytes (a plan hashes
    them, reads nothing), and the settings that plan two of them."""
    for name in ReleasedConfig.sets:
        (root / name).mkdir(parents=True, exist_ok=True)
        for f in FILES:
            (root / name / f).write_bytes(b"probe " + name.encode())
    return {"released": {"sets": ["drand_CIFAR", "ddet_CIFAR"], "root": str(root)}}


EXPERIMENT = register(Experiment(
    name="released",
    summary="students of the paper's released sets (drand, ddet, robust, non_robust CIFAR), imported by content",
    plan=plan, table=build_table, section=("released", ReleasedConfig),
    check=lambda cfg: [released_folder(cfg, name) for name in cfg.released.sets], probes=Probes(probe_folder)))
