"""controls: the replication's sets beside controls that carry no features of the source.

- ``leak-K`` for each PGD set K: K's rows and targets, but instead of PGD each image gets one
  fixed random pattern of norm eps per target class (a shortcut a student can learn, with none of
  the source's features). With ``construct.leak_keep_t_eq_y`` rows whose target is their own label
  stay unperturbed, as a public replication did (its ResNet-9 numbers: rand 79.5, det 32.3, other
  50.1 on the clean test set).
- ``rand-clean-only`` (when rand is built): only D_rand's rows whose target is their own label,
  unperturbed: how much of a rand student's accuracy those ~1/C correctly labelled rows explain.

Students, selection and evaluation exactly as for the PGD sets; every stage of ``replicate`` with
the same config is reused from the store (same keys)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from advfeatures.config import PGD_KINDS, ExperimentConfig
from pipeline.experiments import Experiment, register
from pipeline.plan import Plan, make_plan


def with_controls(cfg: ExperimentConfig) -> ExperimentConfig:
    sets = tuple(cfg.construct.sets)
    controls = [f"leak-{k}" for k in sets if k in PGD_KINDS] + (["rand-clean-only"] if "rand" in sets else [])
    if not controls:
        from advfeatures.config import ConfigError

        raise ConfigError(f"construct.sets={list(sets)} has no PGD set to control; add rand, other or det")
    return dataclasses.replace(cfg, construct=dataclasses.replace(
        cfg.construct, sets=sets + tuple(c for c in controls if c not in sets)))


def plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    return make_plan(with_controls(cfg), source_sha256)


def write(store: Any, plan: Plan, cfg: ExperimentConfig) -> Path:
    from pipeline import report

    return report.write_run(store, plan, with_controls(cfg))


EXPERIMENT = register(Experiment(
    name="controls",
    summary="the replication beside leak-K (a fixed random pattern per target class, no PGD) and rand-clean-only",
    plan=plan, write=write))
