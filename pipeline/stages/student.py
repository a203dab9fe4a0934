"""student: a fresh model (its own initial weights unless ``student.init`` says otherwise)
trained only on a constructed set's (x, y_target), after the set is checked against its checksums."""

from __future__ import annotations

from advfeatures.config import RuntimeConfig
from pipeline.common import Context, Log, once, quiet, verified_set
from pipeline.kinds import StageKind, StageSpec, declare
from pipeline.stages.model import fit_and_save, trained_summary, verify_weights
from storage.store import Store


@once
def train_student(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """A fresh model trained only on the constructed set ``spec.inputs[0]`` (x, y_target); with
    ``track_test``, its second input is the dataset whose clean test set it is evaluated on after
    every epoch."""
    construct_key = spec.inputs[0]
    cman, rows = verified_set(store, construct_key, names=("x", "y_target"))
    return fit_and_save(store, spec, rows["x"], rows["y_target"], cman["num_classes"], rt, log,
                        {"construct_kind": spec.config["set"]})


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return train_student(store, spec, ctx.runtime, ctx.log)


# Bumps: 2: as model 2.
KIND = declare(StageKind("student", 2, "models", execute, "a fresh model trained on a constructed set",
                         label=lambda spec, labels: f"{spec['config']['set']} seed={spec['config'].get('train', {}).get('seed', '?')}",
                         verify=verify_weights, task_name="train-student", events=("epoch",),
                         summary=lambda man: trained_summary(f"student of {man['stage']['config'].get('set')}", man)))
