"""Experiments: each a function from the resolved config to a plan (a graph of stage specs, in
dependency order) and a writer of the table(s) it reports. Adding one means one module here that
calls ``register``, one test and a profile entry; the flow that runs plans does not change.

    EXPERIMENTS["replicate"].plan(cfg, source_sha256) -> plan with .stages(), .labels() and .run
    EXPERIMENTS["replicate"].write(store, plan, cfg)   -> the run folder (tables, config, plan)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from advfeatures.config import ConfigError, ExperimentConfig
from pipeline.kinds import StageSpec


class PlanLike(Protocol):
    run: StageSpec

    def stages(self) -> list[StageSpec]: ...

    def labels(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    """One line for `advfeatures experiments`."""
    plan: Callable[[ExperimentConfig, str], PlanLike]
    """(resolved config, sha256 of the data source) -> the plan."""
    write: Callable[[Any, PlanLike, ExperimentConfig], Path]
    """(store, plan, config) -> the run folder holding the tables; called once every stage is done."""


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; `advfeatures experiments` lists them: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]


from pipeline.experiments import replicate as _replicate  # noqa: E402, F401, I001 - each registers itself
from pipeline.experiments import controls as _controls  # noqa: E402, F401
from pipeline.experiments import errors_sweep as _errors_sweep  # noqa: E402, F401
from pipeline.experiments import released as _released  # noqa: E402, F401
