"""run: a plan's tables (CSV, Markdown, Parquet), its resolved config and its stages, under
runs/<run key>/, written by the experiment's writer (``pipeline.experiments``)."""

from __future__ import annotations

from pipeline.common import Context
from pipeline.kinds import StageSpec
from storage.store import Store


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    from pipeline.experiments import get

    if ctx.plan is None or ctx.config is None or ctx.plan.run.key != spec.key:
        raise ValueError(f"the run stage {spec.key} needs its plan and config in the context")
    get(ctx.experiment).write(store, ctx.plan, ctx.config)
    return spec.key
