"""controls: the replication's sets beside controls that carry no features of the source.

- ``leak-K`` for each PGD set K: K's rows and targets, but instead of PGD each image gets one
  fixed random pattern of norm eps per target class (a shortcut a student can learn, with none of
  the source's features). With ``controls.leak_keep_t_eq_y`` rows whose target is their own label
  stay unperturbed, as a public replication did (its ResNet-9 numbers: rand 79.5, det 32.3, other
  50.1 on the clean test set).
- ``rand-clean-only`` (when rand is built): only D_rand's rows whose target is their own label,
  unperturbed: how much of a rand student's accuracy those ~1/C correctly labelled rows explain.
- ``clean-K``, the row-matched selection control, for each PGD set K: exactly the rows K's
  students train on (after margin selection, if any), each labelled with its target t, but with
  the clean image put back. Selection keeps the rows on which the source is most confident of t;
  if it found images that already look like t to a standard model, students learn t from robust,
  perceptible cues, and ``clean-K`` scores as K does. The gap between K and ``clean-K`` is what
  the perturbation adds on top of the rows selection chose. Its students train with K's recipe
  (``student.per_set.K``) unless ``student.per_set.clean-K`` says otherwise.

Each control mirrors every construction setting of its set: the subset, seed and storage dtype
and, with ``construct.augment_copies``, the same copies of each image, cropped and flipped as the
PGD set's are (so its students train on as many rows, from the same crops).

The plan is replicate's plan plus the control sets (students, selection and evaluation exactly as
for the PGD sets), so every stage of ``replicate`` with the same config is reused from the store."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from advfeatures import construct as C
from advfeatures.attacks import threat_model
from advfeatures.config import ConfigError, ExperimentConfig, _check, register_section
from pipeline.common import (Context, dataset_info, load_model, load_split, once, run_record, save_set, setup_runtime,
                             verified_set)
from pipeline.experiments import Experiment, register
from pipeline.experiments.replicate import table
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_set, add_students, make_plan, order_core
from pipeline.sets import SetBuilder
from pipeline.sets import register as register_set
from pipeline.sets.pgd import KINDS as PGD_KINDS
from pipeline.sets.pgd import set_rows
from pipeline.stages.construct import attack_summary
from storage.store import Store, StoreError

LEAK = tuple(f"leak-{k}" for k in PGD_KINDS)
CLEAN_ONLY = "rand-clean-only"
MATCHED = tuple(f"clean-{k}" for k in PGD_KINDS)
"""The row-matched selection controls: K's trained rows, clean, labelled t."""


def control_rows(cfg: dict, y_all: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A control's rows as K's (each image's copies, cropped and flipped as K's are): image index,
    target and copy number of each row (rand-clean-only: only the rows whose target is their label)."""
    kind = cfg["kind"]
    idx, t, copy = set_rows(cfg, base_kind(kind), y_all, num_classes)
    if kind == CLEAN_ONLY:
        keep = t == y_all[idx]
        idx, t, copy = idx[keep], t[keep], copy[keep]
    return idx, t, copy


def clean_images(x_all: np.ndarray, idx: np.ndarray, copy: np.ndarray, cfg: dict) -> np.ndarray:
    """The clean images of a set's rows (uint8): each image, or with ``augment_copies`` (in the
    set's ``cfg``) its copy's crop and flip, as the PGD set attacks them."""
    if not cfg.get("augment_copies", 0):
        return x_all[idx]
    return C.crop_flip(x_all[idx], C.copy_params(cfg["seed"], idx, copy))


def base_kind(kind: str) -> str:
    """The PGD set whose rows and targets a control mirrors: leak-rand -> rand; rand-clean-only -> rand."""
    return kind[len("leak-"):] if kind.startswith("leak-") else "rand"


@once
def build_control(store: Store, spec: StageSpec, rt, log=lambda _m: None) -> str:
    """leak-K: the rows and targets of set K (same subset and seed), each image plus one fixed
    random pattern of norm eps per target class (clipped to [0, 1]); with ``keep_t_eq_y``, rows
    whose target is their own label stay unperturbed. rand-clean-only: D_rand's rows whose target
    is their own label, unperturbed. Records (fooled, loss, norm, margin) under the source, on the
    stored images, as for PGD sets, so margin selection applies to controls alike."""
    dataset_key, source_key = spec.inputs
    cfg, kind = spec.config, spec.config["kind"]
    device = setup_runtime(rt)
    t0 = time.perf_counter()
    info = dataset_info(store, dataset_key)
    num_classes = len(info["classes"])
    x_all, y_all = load_split(store, dataset_key, "train")
    idx, t, copy = control_rows(cfg, y_all, num_classes)
    block = clean_images(x_all, idx, copy, cfg)
    norm, eps = cfg.get("norm", "l2"), cfg.get("eps", 0.0)
    patterns = C.leak_patterns(num_classes, tuple(info["image_shape"]), norm, eps, cfg["seed"]) \
        if kind in LEAK else None
    unperturbed = (t == y_all[idx]) if cfg.get("keep_t_eq_y") else None
    arrays = C.pattern_block(load_model(store, source_key, device), block, t, threat_model(norm, max(eps, 1e-12)),
                             device, rt.eval_batch_size, cfg["dtype"], patterns, unperturbed)
    rows = {**arrays, "y_target": t, "y_true": y_all[idx], "index": idx}
    summary = attack_summary(rows)
    save_set(store, spec, rows, info["classes"], summary, run_record(rt, device), t0,
             seeds={"construct": cfg["seed"]})
    log(f"control {kind} {spec.key}: {len(idx)} rows, the source predicts the target on "
        f"{summary['attack_success']:.3f}")
    return spec.key


def matched_rows(store: Store, trained_on: str, y_all: np.ndarray, num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The rows students of a PGD set train on (``trained_on``: its margin selection, or the set
    itself when there is none), as image index, target and copy number of each row, and the PGD
    set's config. The selected positions come from the PGD set's stored margins by the selection's
    own rule (``selected_positions``), and are checked against the rows the selection stored."""
    from pipeline.stages.select import selected_positions

    man = store.manifest("constructed", trained_on)
    stage = man["stage"]
    parent = stage["inputs"][0] if stage["stage"] == "select" else trained_on
    pcfg = store.manifest("constructed", parent)["stage"]["config"]
    idx, t, copy = set_rows(pcfg, pcfg.get("targets", pcfg["kind"]), y_all, num_classes)
    if stage["stage"] == "select":
        _, rec = verified_set(store, parent, names=("margin", "y_target", "y_true"))
        pos = selected_positions(rec, stage["config"]["fraction"])
        _, kept = verified_set(store, trained_on, names=("index", "y_target"))
        if not (np.array_equal(kept["index"], idx[pos]) and np.array_equal(kept["y_target"], t[pos])):
            raise StoreError(f"constructed/{trained_on}: the selection's rows are not those its rule picks from "
                             f"constructed/{parent}; run `advfeatures verify {trained_on} --repair` and rerun")
        idx, t, copy = idx[pos], t[pos], copy[pos]
    return idx, t, copy, pcfg


@once
def build_matched(store: Store, spec: StageSpec, rt, log=lambda _m: None) -> str:
    """clean-K: the rows K's students train on (``spec.inputs[2]``: K's selection, or K), each
    labelled with its target t, with the clean image (with augmented copies, the same crop and flip
    as K's row) instead of the perturbed one. Records (fooled, loss, norm, margin) under the source
    on the clean images: ``fooled`` is then the share of rows the source already gives t unperturbed."""
    dataset_key, source_key, trained_on = spec.inputs
    device = setup_runtime(rt)
    t0 = time.perf_counter()
    info = dataset_info(store, dataset_key)
    x_all, y_all = load_split(store, dataset_key, "train")
    idx, t, copy, pcfg = matched_rows(store, trained_on, y_all, len(info["classes"]))
    block = clean_images(x_all, idx, copy, pcfg)
    arrays = C.pattern_block(load_model(store, source_key, device), block, t, threat_model("l2", 1e-12), device,
                             rt.eval_batch_size, spec.config["dtype"])
    rows = {**arrays, "y_target": t, "y_true": y_all[idx], "index": idx}
    summary = attack_summary(rows)
    save_set(store, spec, rows, info["classes"], summary, run_record(rt, device), t0,
             seeds={"construct": pcfg["seed"]}, parent=trained_on)
    log(f"control {spec.config['kind']} {spec.key}: {len(idx)} rows of {trained_on}, clean; the source gives "
        f"their target to {summary['attack_success']:.3f} of them unperturbed")
    return spec.key


def matched_spec(cfg: ExperimentConfig, kind: str, dataset: StageSpec, source: StageSpec,
                 trained_on: StageSpec) -> StageSpec:
    """clean-K from the rows K's students train on: everything that decides them is in
    ``trained_on``'s key; the storage dtype is the set's."""
    return StageSpec("construct", {"kind": kind, "dtype": cfg.construct.dtype}, (dataset.key, source.key, trained_on.key))


def control_spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    """Every construction setting of the set the control mirrors: subset, seed, storage dtype and,
    when on, its augmented copies (keyed only then, as for PGD sets)."""
    c = cfg.construct
    if kind == CLEAN_ONLY:  # D_rand's t = y rows, unperturbed: records under the source
        config = {"kind": kind, "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype}
    else:
        config = {"kind": kind, "norm": cfg.attack.norm, "eps": cfg.attack.eps,  # no PGD
                  "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype,
                  "keep_t_eq_y": cfg.controls.leak_keep_t_eq_y}
    if c.augment_copies:
        config["augment_copies"] = c.augment_copies
    return StageSpec("construct", config, inputs)


def _build(store: Store, spec: StageSpec, ctx: Context) -> str:
    build = build_matched if spec.config["kind"] in MATCHED else build_control
    return build(store, spec, ctx.runtime, ctx.log)


register_set(SetBuilder(LEAK, "PGD set K's rows and targets plus one fixed random pattern of norm eps per target class",
                        build=_build, spec=control_spec, perturbed=True, task_name="build-control", rows=control_rows))
register_set(SetBuilder((CLEAN_ONLY,), "D_rand's rows whose target is their own label, unperturbed",
                        build=_build, spec=control_spec, task_name="build-control", rows=control_rows))
register_set(SetBuilder(MATCHED, "the rows PGD set K's students train on (after margin selection), clean, labelled t",
                        build=_build, plannable=False, selectable=False, task_name="build-control"))


KINDS = ("leak", "clean-only", "matched")


@dataclass(frozen=True)
class ControlsConfig:
    kinds: tuple[str, ...] = KINDS
    """The controls experiment's controls: 'leak' (leak-K: a fixed pattern per target class instead
    of PGD), 'clean-only' (rand-clean-only: D_rand's t = y rows, unperturbed) and 'matched' (clean-K:
    the rows K's students train on, clean, labelled t)."""
    leak_keep_t_eq_y: bool = False
    """leak sets (wherever they are planned): leave rows whose target is their own label unperturbed
    (as a public replication did), instead of adding their class pattern to them too."""

    def __post_init__(self):
        _check(len(self.kinds) >= 1 and set(self.kinds) <= set(KINDS),
               f"controls.kinds={list(self.kinds)}; choose among {list(KINDS)}")
        _check(len(set(self.kinds)) == len(self.kinds), f"controls.kinds has repeats: {list(self.kinds)}")


def controls_of(sets: tuple[str, ...], kinds: tuple[str, ...] = KINDS) -> list[str]:
    return [f"leak-{k}" for k in sets if k in PGD_KINDS and "leak" in kinds] + \
        ([CLEAN_ONLY] if "rand" in sets and "clean-only" in kinds else [])


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    """replicate's plan plus, for each PGD set, the controls of ``controls.kinds``: its leak
    control, rand-clean-only and its row-matched selection control clean-K."""
    if not any(k in PGD_KINDS for k in cfg.construct.sets):
        raise ConfigError(f"construct.sets={list(cfg.construct.sets)} has no PGD set to control; add rand, other or det")
    out = Plan(make_plan(cfg, source_sha256).nodes())
    for kind in controls_of(tuple(cfg.construct.sets), cfg.controls.kinds):
        if kind not in cfg.construct.sets:
            add_set(out, cfg, kind)
    if "matched" in cfg.controls.kinds:
        add_matched(out, cfg)
    return order_core(out).with_run(cfg.name)


def add_matched(plan: Plan, cfg: ExperimentConfig) -> None:
    """clean-K for each PGD set K of the plan, beside K: its students train on it as K's do."""
    ds, source = plan.dataset, plan.source
    for k in [k for k in cfg.construct.sets if k in PGD_KINDS]:
        trained_on = plan.selections.get(k) or plan.constructs[k]
        spec = plan.add(matched_spec(cfg, f"clean-{k}", ds, source, trained_on), f"clean-{k}", role="set",
                        set=f"clean-{k}")
        add_students(plan, cfg, f"clean-{k}", spec, ds, source, recipe=k)


register_section("controls", ControlsConfig, moved={"construct.leak_keep_t_eq_y": "controls.leak_keep_t_eq_y"})
EXPERIMENT = register(Experiment(
    name="controls",
    summary="the replication beside leak-K (a fixed random pattern per target class, no PGD), rand-clean-only and "
            "clean-K (the rows K's students train on, unperturbed)",
    plan=plan, table=table, section=("controls", ControlsConfig), varies_sources=True))
