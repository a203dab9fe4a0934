"""select: the rows of a PGD set with the largest target margin under the source (construct.select),
taken separately among rows with t = y and t != y, as a constructed set of its own."""

from __future__ import annotations

import time

import numpy as np

from advfeatures import construct as C
from advfeatures.config import RuntimeConfig
from pipeline.common import Context, Log, once, quiet, run_record, save_set, verified_set
from pipeline.kinds import StageKind, StageSpec, declare
from pipeline.stages.construct import attack_summary, verify_set
from storage.store import Store


def selected_positions(rows: dict, fraction: float) -> np.ndarray:
    """The positions, in a PGD set, of the rows its selection keeps: the ``fraction`` with the
    largest target margin among rows with t = y and among rows with t != y (``rows``: the set's
    ``margin``, ``y_target`` and ``y_true``). The selection and the row-matched control
    (``pipeline.experiments.controls``) both take their rows from here."""
    return C.select_by_margin(rows["margin"], fraction, strata=rows["y_target"] == rows["y_true"])


@once
def select_rows(store: Store, spec: StageSpec, rt: RuntimeConfig | None = None, log: Log = quiet) -> str:
    """The ``fraction`` of a PGD set's rows with the largest target margin under the source (the
    ``margin`` record, computed on the stored images), in their original order, as a set of its own.
    The fraction is taken separately among rows with t = y and t != y, so selection does not change
    their shares (rand)."""
    (construct_key, _source_key), fraction = spec.inputs, spec.config["fraction"]
    t0 = time.perf_counter()
    cman, rows = verified_set(store, construct_key)
    keep = selected_positions(rows, fraction)
    kept = {k: v[keep] for k, v in rows.items()}
    summary = {**attack_summary(kept), "fraction": fraction, "n_parent": int(len(rows["margin"])),
               "min_margin_kept": float(kept["margin"].min()),
               "attack_success_parent": cman["summary"]["attack_success"]}
    save_set(store, spec, kept, cman["classes"], summary, run_record(rt), t0, parent=construct_key,
             seeds=cman.get("seeds", {}))
    log(f"selected {len(keep)} of {len(rows['margin'])} rows of {construct_key} by target margin "
        f"(>= {summary['min_margin_kept']:.3f}); fooled {summary['attack_success']:.3f}")
    return spec.key



def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return select_rows(store, spec, ctx.runtime, ctx.log)


KIND = declare(StageKind("select", 1, "constructed", execute,
                         "the rows of a PGD set with the largest target margin under the source",
                         label=lambda spec, labels: f"{labels.get(spec['inputs'][0], 'set')} top {spec['config']['fraction']:g}",
                         verify=verify_set, task_name="select-set",
                         summary=lambda man: f"top {man['stage']['config'].get('fraction')} by margin of "
                                             f"{(man['stage'].get('inputs') or ['?'])[0]}"))
