"""Set builders: every kind of constructed training set, registered by the module that owns it.

A builder says how a set of its kind is specified from the experiment's config (``spec``: the
stage spec whose config is the set's key material), which model it needs (``upstream``: the
source or the teacher), and how it is computed: at once (``build(store, spec, ctx) -> key``) or
shard by shard (``sharded``: prepare, shard, finalize; the flow fans the shards out). The
``construct`` stage kind dispatches to the builder named by the spec's ``kind``; there is no other
table of set kinds. Kinds with ``plannable`` may be named in ``construct.sets``.

    pipeline.sets.pgd       rand, other, det (targeted PGD, section 3.2; sharded)
    pipeline.sets.errors    errors (Wallace 2019: a teacher's mistakes)
    pipeline.experiments.*  the sets an experiment brings (its controls, imports, poisons)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from advfeatures.config import ConfigError, register_set_kind


@dataclass(frozen=True)
class SetBuilder:
    kinds: tuple[str, ...]
    """The ``kind`` values (in a construct spec's config) this builder computes."""
    doc: str
    build: Callable[..., str] | None = None
    """(store, spec, ctx) -> key, for sets computed at once (the builder checks completeness)."""
    sharded: Any = None
    """``pipeline.kinds.Sharded`` for sets computed shard by shard."""
    spec: Callable[..., Any] | None = None
    """(config, kind, inputs) -> StageSpec: the set as a plan names it from an experiment's config."""
    upstream: str = "source"
    """The model the set is made with: 'source' or 'teacher' (the plan makes the teacher then)."""
    perturbed: bool = False
    """Its images are perturbed clean training images (the report shows examples and norms)."""
    plannable: bool = True
    """May be named in ``construct.sets``."""
    selectable: bool = True
    """Margin selection (``construct.select``) applies to it when it is made with the source."""
    rows: Callable[..., Any] | None = None
    """(set config, training labels, number of classes) -> image index, target and copy number of
    each row: which image each row of a set built on augmented copies (``augment_copies``) crops
    and flips (the report's examples show those crops)."""
    report: Callable[..., None] | None = None
    """(doc, store, run info, figures folder, device) -> None: its figures in the report of a run
    holding sets of its kinds (``pipeline.html_report``), after the training curves."""
    task_name: str = "build-set"


BUILDERS: dict[str, SetBuilder] = {}


def register(builder: SetBuilder) -> SetBuilder:
    for k in builder.kinds:
        if k in BUILDERS and BUILDERS[k] is not builder:
            raise ValueError(f"set kind {k!r} is registered twice")
        BUILDERS[k] = builder
        register_set_kind(k, builder.plannable)
    return builder


def builder(kind: str) -> SetBuilder:
    if kind not in BUILDERS:
        from pipeline.kinds import discover

        discover()
    if kind not in BUILDERS:
        raise ConfigError(f"unknown set kind {kind!r}; registered: {sorted(BUILDERS)}")
    return BUILDERS[kind]
