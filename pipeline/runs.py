"""A run of a plan, as the orchestration reports it, without Prefect: what each stage took
(``stage_timings``, ``timings_md``), whether a rerun has anything to do (``finished``), and the
run's report (``report_for``). ``flows.replicate`` publishes these as Prefect artifacts; the CLI
prints a finished run without starting Prefect."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from advfeatures.config import ExperimentConfig
from storage.store import Store


def stage_timings(store: Store, plan: Any, since: float) -> list[dict[str, Any]]:
    """Per stage: seconds it took and whether this run computed it or found it cached."""
    rows, names = [], plan.labels()
    for spec in plan.stages():
        if not store.is_complete(spec.folder, spec.key):
            continue
        man = store.manifest(spec.folder, spec.key)
        created = _dt.datetime.fromisoformat(man["created"]).timestamp()
        rows.append({"stage": spec.stage, "what": names[spec.key], "key": spec.key, "seconds": man.get("seconds", 0.0),
                     "computed": created >= since})
    return rows


def timings_md(timings: list[dict[str, Any]]) -> str:
    lines = ["| stage | what | key | seconds | this run |", "|---|---|---|---:|---|"]
    for t in timings:
        lines.append(f"| {t['stage']} | {t['what']} | {t['key']} | {t['seconds']:.1f} | "
                     f"{'computed' if t['computed'] else 'cached'} |")
    computed = sum(t["seconds"] for t in timings if t["computed"])
    lines.append(f"\ncomputed this run: {computed:.1f} s of stage time")
    return "\n".join(lines)


def finished(cfg: ExperimentConfig, experiment: str) -> tuple[Path, int] | None:
    """(the run folder, the number of stages of its plan) when a rerun has nothing to do: every
    stage of the plan and the run folder complete in a local store, and its report (if written)
    drawn from them by this code. None: there is work, or the store is a URL (its server records
    runs)."""
    st = Store(cfg.runtime.store)
    if st.remote or not st.root.is_dir():
        return None
    from pipeline.experiments import plan_for
    from pipeline.report_data import report_is_current

    plan = plan_for(cfg, experiment)
    if not all(st.is_complete(s.folder, s.key) for s in plan.stages()):
        return None
    folder = st.path(plan.run.folder, plan.run.key)
    if cfg.report.write and not report_is_current(folder):
        return None
    return folder, len(plan.stages())


def report_for(st: Store, folder: Path, write: bool = True) -> Path | None:
    """The folder's report.html (report.md and figures/ beside it). One drawn from the same files
    by the same code (``report_data.report_is_current``: a rerun that changed nothing) is kept as
    it is, without importing matplotlib; else it is drawn. None without ``write``
    (report.write=false), or when drawing fails: said, not raised (the run's tables are written)."""
    from pipeline.report_data import report_is_current

    if not write:
        print(f"report: not written (report.write=false); `advfeatures report {folder}` writes it")
        return None
    if report_is_current(folder):
        print(f"report (unchanged: drawn from these tables and stages by this code; `advfeatures report {folder}` "
              "draws it again):")
        return folder / "report.html"
    from pipeline.html_report import write_report

    try:
        return write_report(st, folder)
    except Exception as e:  # noqa: BLE001 - the results are safe in the store; say how to retry
        print(f"the report could not be written ({type(e).__name__}: {e}); the tables are in {folder}; "
              f"retry with `advfeatures report {folder}`")
        return None
