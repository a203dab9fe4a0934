"""replicate: section 3.2 of Ilyas et al. (2019) and Wallace (2019). A source, the PGD sets
(rand, other, det; optionally margin-selected), the errors set of a briefly trained teacher,
students of every set over seeds, clean-test evaluations, and Table 1 beside the published numbers."""

from __future__ import annotations

from pipeline.experiments import Experiment, register
from pipeline.plan import make_plan

EXPERIMENT = register(Experiment(
    name="replicate",
    summary="section 3.2 (rand, other, det) and Wallace's errors set: students on the clean test set, Table 1",
    plan=make_plan, varies_sources=True))
