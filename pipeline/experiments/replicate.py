"""replicate: section 3.2 of Ilyas et al. (2019) and Wallace (2019). A source, the PGD sets
(rand, other, det; optionally margin-selected), the errors set of a briefly trained teacher,
students of every set over seeds, clean-test evaluations, and Table 1 beside the published numbers."""

from __future__ import annotations

from typing import Any

from pipeline.experiments import Experiment, register
from pipeline.plan import make_plan

PAPER = {"D": 95.3, "rand": 63.3, "det": 43.7, "errors": 49.7}
"""Clean test accuracy (%) reported for CIFAR-10: Ilyas et al. Table 1 (ResNet-50) and, for errors,
Wallace (2019, ResNet-18 on 18,768 mislabeled images). D_other is not in the paper."""


def table(store: Any, plan: Any) -> Any:
    """Table 1: one row per model, beside the published numbers (``paper_%``)."""
    from pipeline.report import build_table

    return build_table(store, plan, PAPER)


EXPERIMENT = register(Experiment(
    name="replicate",
    summary="section 3.2 (rand, other, det) and Wallace's errors set: students on the clean test set, Table 1",
    plan=make_plan, table=table, varies_sources=True))
