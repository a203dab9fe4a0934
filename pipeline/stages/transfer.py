"""transfer: how a constructed set's images fool another model (section 3.3; Nakkiran 2019).

For a set (inputs[0]) and a model that did not make it (inputs[1]): the model's predictions on
the set's stored images, and from them the transfer success (the share of rows with t != y that
the model classifies as t), the share classified as t over all rows, and the share it still
classifies as the true label. These are fooling rates of adversarial training images, not test
accuracies: no model is evaluated here on anything but those images, and the clean test set is
untouched."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from advfeatures.config import RuntimeConfig
from advfeatures.training import predict
from pipeline.common import Context, Log, load_model, once, publish, quiet, run_record, setup_runtime, verified_set
from pipeline.kinds import StageKind, StageSpec, declare
from storage.store import Store


def transfer_metrics(pred: np.ndarray, y_target: np.ndarray, y_true: np.ndarray) -> dict[str, Any]:
    """Transfer success over rows with t != y, the target share over all rows, the true-label share."""
    differ = y_target != y_true
    return {"n": int(len(pred)), "n_t_ne_y": int(differ.sum()),
            "transfer_success": float((pred[differ] == y_target[differ]).mean()) if differ.any() else float("nan"),
            "predicts_target": float((pred == y_target).mean()), "predicts_true": float((pred == y_true).mean())}


@once
def measure_transfer(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    set_key, model_key = spec.inputs
    device = setup_runtime(rt)
    t0 = time.perf_counter()
    _, rows = verified_set(store, set_key, names=("x", "y_target", "y_true"))
    model = load_model(store, model_key, device)
    pred = predict(model, torch.from_numpy(rows["x"]), rt.eval_batch_size, device, rt.channels_last).numpy()
    metrics = transfer_metrics(pred, rows["y_target"], rows["y_true"])
    publish(store, spec, t0, metrics=metrics, **run_record(rt, device))
    log(f"transfer {set_key} -> {model_key}: {metrics['transfer_success']:.3f} of rows with t != y")
    return spec.key


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return measure_transfer(store, spec, ctx.runtime, ctx.log)


def transfer_spec(set_spec: StageSpec, model: StageSpec) -> StageSpec:
    return StageSpec("transfer", {}, (set_spec.key, model.key))


def label(spec: dict, labels: dict[str, str]) -> str:
    set_key, model_key = spec["inputs"]
    return f"transfer {labels.get(set_key, set_key)} -> {labels.get(model_key, model_key)}"


def summary(man: dict[str, Any]) -> str:
    m = man.get("metrics", {})
    return f"transfer success {100 * m.get('transfer_success', float('nan')):.1f}% of {m.get('n_t_ne_y', '?')} rows"


KIND = declare(StageKind("transfer", 1, "evals", execute,
                         "how often a set's images fool a model that did not make them (transfer success)",
                         label=label, task_name="transfer", summary=summary))
