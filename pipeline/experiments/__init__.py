"""Experiments: each is one module of this package, discovered (not listed), that registers
itself: a plan builder over the one stage graph (``pipeline.plan``), its table and Markdown
writers, its own config section (``advfeatures.config.SECTIONS``) and, if it has one, its report
section. Adding an experiment is one module, one test and a profile entry; the flow that runs
plans, the report and the CLI do not change.

    EXPERIMENTS["replicate"].plan(cfg, source_sha256) -> Plan (``pipeline.plan``)
    EXPERIMENTS["replicate"].write(store, plan, cfg)   -> the run folder (tables, config, plan)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advfeatures.config import ConfigError, ExperimentConfig, register_section


@dataclass(frozen=True)
class Probes:
    """What ``pipeline.settings_doc`` plans an experiment with to measure which stage keys hold
    each setting: a plan small enough to make in milliseconds, with a stage of every kind it has."""
    config: dict[str, Any] | Callable[[Path], dict[str, Any]] = field(default_factory=dict)
    """Changes to an empty profile, e.g. {"transfer": {"archs": [small_cnn, cnn_wide]}}; or
    (an empty scratch folder) -> them, for settings that name files (made there, made-up bytes)."""
    mappings: tuple[dict[str, Any], ...] = ()
    """Values to try for its mapping-valued settings (the empty mapping is their default)."""
    alone: bool = False
    """Its plan joins other experiments' plans: planned only for its own section's settings, and
    left out when every other setting is measured."""


@dataclass(frozen=True)
class Experiment:
    name: str
    summary: str
    """One line for `advfeatures experiments`."""
    plan: Callable[[ExperimentConfig, str], Any]
    """(resolved config, sha256 of the data source) -> the plan (``pipeline.plan.Plan``)."""
    table: Callable[[Any, Any], Any] | None = None
    """(store, plan) -> the table (a DataFrame); None: one row per model, without published
    numbers (``pipeline.report.build_table``)."""
    markdown: Callable[[Any], str] | None = None
    """table -> its Markdown; None: ``pipeline.report.to_markdown``."""
    section: tuple[str, type] | None = None
    """(name, dataclass): the experiment's own config section (``cfg.<name>``), validated like
    every other section."""
    check: Callable[[ExperimentConfig], Any] | None = None
    """cfg -> raises ConfigError: what the section's own validation cannot see (files, folders),
    checked by the CLI before any work or server starts; None: nothing beyond the section."""
    report: Callable[..., None] | None = None
    """(doc, store, run info, figures folder) -> None: the experiment's section of the HTML
    report (``pipeline.html_report``), after the table."""
    varies_sources: bool = False
    """Its plan may be repeated over ``source.seeds`` (``pipeline.plan.over_sources``); others
    refuse more than one source seed."""
    probes: Probes | None = None
    """How docs/settings.md measures which keys hold its settings; None: its section's defaults."""

    def plan_of(self, cfg: ExperimentConfig, source_sha256: str) -> Any:
        """The experiment's plan over the run's source seeds (one plan per seed, as one)."""
        from pipeline.plan import over_sources

        return over_sources(self.plan, cfg, source_sha256, self.name, self.varies_sources)

    def write(self, store: Any, plan: Any, cfg: ExperimentConfig) -> Path:
        """The run folder holding the tables; called once every stage is done."""
        from pipeline import report

        return report.write_run(store, plan, cfg, build=self.table, markdown=self.markdown, experiment=self.name)


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    if experiment.name in EXPERIMENTS and EXPERIMENTS[experiment.name] is not experiment:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    if experiment.section is not None:
        register_section(*experiment.section)
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        from pipeline.kinds import discover

        discover()
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; `advfeatures experiments` lists them: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def plan_for(cfg: ExperimentConfig, experiment: str = "replicate", until: str | None = None) -> Any:
    """Fingerprint the data source (sha256 of its bytes, read again only when its size or mtime
    changed) and derive every stage key of the experiment's plan; with ``until``, only the stages
    of that kind and what they need."""
    from pipeline.stages import locate_source, source_sha256
    from storage.store import Store

    plan = get(experiment).plan_of(cfg, source_sha256(locate_source(cfg.data), Store(cfg.runtime.store)))
    return plan.until(until) if until else plan


def all_experiments() -> dict[str, Experiment]:
    """Every experiment, in the order they were found (replicate first)."""
    from pipeline.kinds import discover

    discover()
    return dict(sorted(EXPERIMENTS.items(), key=lambda kv: (kv[0] != "replicate", kv[0])))


def _discover_now() -> None:
    from pipeline.kinds import discover

    discover()


_discover_now()  # every experiment module registers itself (and its config section) on import
