"""run: a plan's table (CSV, Markdown, Parquet), its resolved config and its stages, under
runs/<run key>/ (``pipeline.report``)."""

from __future__ import annotations

from pipeline.common import Context
from pipeline.kinds import StageSpec
from storage.store import Store


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    from pipeline import report  # pandas: only where a table is written

    if ctx.plan is None or ctx.config is None or ctx.plan.run.key != spec.key:
        raise ValueError(f"the run stage {spec.key} needs its plan and config in the context")
    report.write_run(store, ctx.plan, ctx.config)
    return spec.key
