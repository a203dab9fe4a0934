"""eval: a model's accuracy on the original clean test set, on (X, Y) and on (X, Y+1), with 95%
Wilson intervals; with ``robust`` in the config, on untargeted PGD adversarial examples of that
test set (robust accuracy). Never anything but the clean test split."""

from __future__ import annotations

import time

import torch

from advfeatures.attacks import robust_predictions, threat_model
from advfeatures.config import RuntimeConfig
from advfeatures.training import accuracy_metrics, predict
from pipeline.common import (
    Context,
    Log,
    amp_dtype,
    dataset_info,
    load_model,
    load_split,
    once,
    publish,
    quiet,
    run_record,
    setup_runtime,
)
from pipeline.kinds import StageKind, StageSpec, declare
from storage.store import Store


@once
def evaluate(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """Clean test accuracy of model inputs[0] on dataset inputs[1]: on (X, Y) and on (X, Y+1)."""
    model_key, dataset_key = spec.inputs
    device = setup_runtime(rt)
    x, y = load_split(store, dataset_key, "test")
    num_classes = len(dataset_info(store, dataset_key)["classes"])
    model = load_model(store, model_key, device)
    t0 = time.perf_counter()
    if "robust" in spec.config:  # untargeted PGD on the clean test set, then the same metrics
        a = spec.config["robust"]
        pred = robust_predictions(model, torch.from_numpy(x), torch.from_numpy(y), threat_model(a["norm"], a["eps"]),
                                  a["steps"], a["step_size"], rt.eval_batch_size, device,
                                  amp_dtype(spec.config["amp"]))
    else:
        pred = predict(model, torch.from_numpy(x), rt.eval_batch_size, device, rt.channels_last)
    metrics = accuracy_metrics(pred, torch.from_numpy(y), num_classes)
    publish(store, spec, t0, metrics=metrics, **run_record(rt, device))
    log(f"eval {model_key}: acc(X,Y) {metrics['acc_xy']:.4f}  acc(X,Y+1) {metrics['acc_xy1']:.4f}")
    return spec.key


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return evaluate(store, spec, ctx.runtime, ctx.log)


def label(spec: dict, labels: dict[str, str]) -> str:
    eps = spec["config"].get("robust", {}).get("eps")
    return f"eval {labels.get(spec['inputs'][0], spec['inputs'][0])}" + (f" eps={eps:g}" if eps is not None else "")


KIND = declare(StageKind("eval", 1, "evals", execute, "clean (or robust) test accuracy of a model", label=label,
                         task_name="evaluate"))
