"""released: students of the datasets the paper's authors released (``drand_CIFAR``,
``ddet_CIFAR``, ``robust_CIFAR``, ``non_robust_CIFAR``), imported into our constructed-set layout
and keyed by the sha256 of their files, then trained and evaluated on the clean test set of our
dataset exactly like the sets we construct.

Each folder holds ``CIFAR_ims`` and ``CIFAR_lab``: torch-saved lists of tensors, concatenated
along the first axis (images (N, 3, 32, 32) float in [0, 1]; labels (N,) int). The true labels
of the images are not part of the release: ``y_true`` and ``index`` are -1 and the attack records
are NaN."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig
from pipeline.experiments import Experiment, register
from pipeline.kinds import StageSpec
from pipeline.plan import dataset_spec, student_spec
from storage.hashing import path_sha256

FILES = ("CIFAR_ims", "CIFAR_lab")


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


@dataclass(frozen=True)
class ReleasedPlan:
    dataset: StageSpec
    sets: dict[str, StageSpec]
    students: list[tuple[str, int, StageSpec, StageSpec]]  # (set name, seed, student, eval)
    run: StageSpec

    def stages(self) -> list[StageSpec]:
        return [self.dataset, *self.sets.values(), *[x for _, _, s, e in self.students for x in (s, e)], self.run]

    def labels(self) -> dict[str, str]:
        out = {self.dataset.key: "data", self.run.key: "table"}
        out.update({s.key: f"released {name}" for name, s in self.sets.items()})
        for name, seed, s, e in self.students:
            out[s.key] = out[e.key] = f"{name} seed={seed}"
        return out


def plan(cfg: ExperimentConfig, source_sha256: str) -> ReleasedPlan:
    ds = dataset_spec(source_sha256)
    sets = {name: released_spec(cfg, name, ds.key) for name in cfg.released.sets}
    students = []
    for name, spec in sets.items():
        for seed in cfg.student.seeds:
            s = student_spec(cfg, name, seed, spec, None)
            students.append((name, seed, s, StageSpec("eval", {"labels": "clean"}, (s.key, ds.key))))
    return ReleasedPlan(ds, sets, students, StageSpec("run", {"name": cfg.name}, tuple(e.key for *_, e in students)))


def build_table(store: Any, plan: ReleasedPlan) -> Any:
    import pandas as pd

    from pipeline.report import _row

    return pd.DataFrame([_row(store, name, s, e, store.manifest("constructed", plan.sets[name].key), None)
                         for name, _seed, s, e in plan.students])


def write(store: Any, plan: ReleasedPlan, cfg: ExperimentConfig) -> Path:
    from pipeline import report

    return report.write_run(store, plan, cfg, build=build_table)


EXPERIMENT = register(Experiment(
    name="released",
    summary="students of the paper's released sets (drand, ddet, robust, non_robust CIFAR), imported by content",
    plan=plan, write=write))
