"""controls: the replication's sets beside controls that carry no features of the source.

- ``leak-K`` for each PGD set K: K's rows and targets, but instead of PGD each image gets one
  fixed random pattern of norm eps per target class (a shortcut a student can learn, with none of
  the source's features). With ``construct.leak_keep_t_eq_y`` rows whose target is their own label
  stay unperturbed, as a public replication did (its ResNet-9 numbers: rand 79.5, det 32.3, other
  50.1 on the clean test set).
- ``rand-clean-only`` (when rand is built): only D_rand's rows whose target is their own label,
  unperturbed: how much of a rand student's accuracy those ~1/C correctly labelled rows explain.

Each control mirrors every construction setting of its set: the subset, seed and storage dtype
and, with ``construct.augment_copies``, the same copies of each image, cropped and flipped as the
PGD set's are (so its students train on as many rows, from the same crops).

The plan is replicate's plan plus the control sets (students, selection and evaluation exactly as
for the PGD sets), so every stage of ``replicate`` with the same config is reused from the store."""

from __future__ import annotations

import time

import numpy as np

from advfeatures import construct as C
from advfeatures.attacks import threat_model
from advfeatures.config import ConfigError, ExperimentConfig
from pipeline.common import Context, dataset_info, load_model, load_split, once, run_record, save_set, setup_runtime
from pipeline.experiments import Experiment, register
from pipeline.kinds import StageSpec
from pipeline.plan import Plan, add_set, make_plan, order_core
from pipeline.sets import SetBuilder
from pipeline.sets import register as register_set
from pipeline.sets.pgd import KINDS as PGD_KINDS
from pipeline.sets.pgd import set_rows
from pipeline.stages.construct import attack_summary
from storage.store import Store

LEAK = tuple(f"leak-{k}" for k in PGD_KINDS)
CLEAN_ONLY = "rand-clean-only"


def control_rows(cfg: dict, y_all: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A control's rows as K's (each image's copies, cropped and flipped as K's are): image index,
    target and copy number of each row (rand-clean-only: only the rows whose target is their label)."""
    kind = cfg["kind"]
    idx, t, copy = set_rows(cfg, base_kind(kind), y_all, num_classes)
    if kind == CLEAN_ONLY:
        keep = t == y_all[idx]
        idx, t, copy = idx[keep], t[keep], copy[keep]
    return idx, t, copy


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
    copies = cfg.get("augment_copies", 0)
    block = x_all[idx] if not copies else C.crop_flip(x_all[idx], C.copy_params(cfg["seed"], idx, copy))
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


def control_spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    """Every construction setting of the set the control mirrors: subset, seed, storage dtype and,
    when on, its augmented copies (keyed only then, as for PGD sets)."""
    c = cfg.construct
    if kind == CLEAN_ONLY:  # D_rand's t = y rows, unperturbed: records under the source
        config = {"kind": kind, "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype}
    else:
        config = {"kind": kind, "norm": cfg.attack.norm, "eps": cfg.attack.eps,  # no PGD
                  "n_images": c.n_images, "seed": c.seed, "dtype": c.dtype, "keep_t_eq_y": c.leak_keep_t_eq_y}
    if c.augment_copies:
        config["augment_copies"] = c.augment_copies
    return StageSpec("construct", config, inputs)


def _build(store: Store, spec: StageSpec, ctx: Context) -> str:
    return build_control(store, spec, ctx.runtime, ctx.log)


register_set(SetBuilder(LEAK, "PGD set K's rows and targets plus one fixed random pattern of norm eps per target class",
                        build=_build, spec=control_spec, perturbed=True, task_name="build-control"))
register_set(SetBuilder((CLEAN_ONLY,), "D_rand's rows whose target is their own label, unperturbed",
                        build=_build, spec=control_spec, task_name="build-control"))


def controls_of(sets: tuple[str, ...]) -> list[str]:
    return [f"leak-{k}" for k in sets if k in PGD_KINDS] + ([CLEAN_ONLY] if "rand" in sets else [])


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    """replicate's plan plus each PGD set's leak control and rand-clean-only."""
    controls = controls_of(tuple(cfg.construct.sets))
    if not controls:
        raise ConfigError(f"construct.sets={list(cfg.construct.sets)} has no PGD set to control; add rand, other or det")
    out = Plan(make_plan(cfg, source_sha256).nodes())
    for kind in controls:
        if kind not in cfg.construct.sets:
            add_set(out, cfg, kind)
    return order_core(out).with_run(cfg.name)


EXPERIMENT = register(Experiment(
    name="controls",
    summary="the replication beside leak-K (a fixed random pattern per target class, no PGD) and rand-clean-only",
    plan=plan))
