"""run: a plan's tables (CSV, Markdown, Parquet), its resolved config and its stages, under
runs/<run key>/, written by the experiment's writer (``pipeline.experiments``)."""

from __future__ import annotations

from pipeline.common import Context
from pipeline.kinds import StageKind, StageSpec, declare
from storage.store import Store


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    from pipeline.experiments import get

    if ctx.plan is None or ctx.config is None or ctx.plan.run.key != spec.key:
        raise ValueError(f"the run stage {spec.key} needs its plan and config in the context")
    get(ctx.experiment).write(store, ctx.plan, ctx.config)
    return spec.key


# Bumps: 2: the table gains init, attack_success_t!=y and share_t=y.
# Not bumped (run keys stay): attack_success_% / attack_success_t!=y_% (over the rows students trained
# on) became fooled_trained_rows_% / fooled_trained_rows_t!=y_%, beside fooled_whole_set_% /
# fooled_whole_set_t!=y_% and trained_rows_%; a table found in the store keeps its older columns, and
# reports read both (pipeline.report.with_fooling).
KIND = declare(StageKind("run", 2, "runs", execute, "the tables of a plan's evaluations",
                         label=lambda spec, labels: "table", task_name="write-tables",
                         summary=lambda man: f"{man['stage']['config'].get('name', 'sweep')}, "
                                             f"{len(man['stage'].get('inputs', []))} inputs"))
