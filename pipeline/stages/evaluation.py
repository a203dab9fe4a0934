"""eval: a model's accuracy on the original clean test set, on (X, Y) and on (X, Y+1), with 95%
Wilson intervals; with ``robust`` in the config, on untargeted PGD adversarial examples of that
test set (robust accuracy). Never anything but the clean test split."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from advfeatures.attacks import robust_predictions, strongest_predictions, threat_model
from advfeatures.config import RuntimeConfig
from advfeatures.data import classes_in_turn
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
    extra: dict[str, Any] = {}
    a = spec.config.get("robust")
    if a and a.get("n"):  # n of the test images, the classes in turn, not the split's head (one class on
        idx = classes_in_turn(y, int(a["n"]))  # a zip or folder source); the keys say so (``subset``)
        x, y = x[idx], y[idx]
    if a and "restarts" in a:  # the attack's strength check
        pred, extra = strength_check(model, x, y, a, rt, device, amp_dtype(spec.config["amp"]))
    elif a:  # untargeted PGD on the clean test set (or n of its images), then the same metrics
        pred = robust_predictions(model, torch.from_numpy(x), torch.from_numpy(y), threat_model(a["norm"], a["eps"]),
                                  a["steps"], a["step_size"], rt.eval_batch_size, device,
                                  amp_dtype(spec.config["amp"]))
        # the clean accuracy of the same images: the robust drop is read against it, not against
        # the whole test set's (1,000 images can differ from all 10,000 by a few points)
        clean = predict(model, torch.from_numpy(x), rt.eval_batch_size, device, rt.channels_last)
        extra["acc_clean_same_images"] = float((clean == torch.from_numpy(y)).double().mean())
    else:
        pred = predict(model, torch.from_numpy(x), rt.eval_batch_size, device, rt.channels_last)
    metrics = {**accuracy_metrics(pred, torch.from_numpy(y), num_classes), **extra}
    publish(store, spec, t0, metrics=metrics, **run_record(rt, device))
    log(f"eval {model_key}: acc(X,Y) {metrics['acc_xy']:.4f}  acc(X,Y+1) {metrics['acc_xy1']:.4f}")
    return spec.key


def strength_check(model: Any, x: np.ndarray, y: np.ndarray, a: dict[str, Any], rt: RuntimeConfig, device: Any,
                   amp: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The test images ``evaluate`` picked (``a['n']`` of them) under the strongest attack: the evaluation's own attack
    (``a['base']``: its steps and step size, from the image) and ``a['steps']`` steps from the
    image and from each of ``a['restarts']`` random starts; a point counts as robust only when no
    attack fools the model (each attack runs on the points no earlier one fooled). Predictions: the
    first attack's that is wrong, else the label. Extra metrics: the base attack's accuracy on the
    same images (``acc_base``), the drop, and the accuracy left after each attack in turn."""
    n = len(y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threat = threat_model(a["norm"], a["eps"])
    base = robust_predictions(model, xt, yt, threat, a["base"]["steps"], a["base"]["step_size"], rt.eval_batch_size,
                              device, amp)
    strong = strongest_predictions(model, xt, yt, threat, a["steps"], a["step_size"], a["restarts"],
                                   seed=int(a.get("seed", 0)), batch_size=rt.eval_batch_size, device=device,
                                   amp_dtype=amp, alive=base == yt, prior=base)  # the points base left robust
    every = torch.cat([base[None], strong])  # (A, n): a fooled point's later rows repeat its fooling prediction
    pred = strong[-1]  # so the last row is the first fooling prediction, or the label
    acc_base = float((base == yt).double().mean())
    acc_strong = float((pred == yt).double().mean())
    return pred, {"acc_base": acc_base, "strength_drop": acc_base - acc_strong, "n_checked": n,
                  "acc_after_each_attack": [float(v) for v in (every == yt[None]).double().mean(1)]}


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return evaluate(store, spec, ctx.runtime, ctx.log)


def label(spec: dict, labels: dict[str, str]) -> str:
    a = spec["config"].get("robust", {})
    eps = a.get("eps")
    check = " check" if "restarts" in a else ""
    return f"eval {labels.get(spec['inputs'][0], spec['inputs'][0])}" + (f" eps={eps:g}{check}" if eps is not None
                                                                          else "")


def summary(man: dict[str, Any]) -> str:
    rob = man["stage"]["config"].get("robust")
    acc = man.get("metrics", {}).get("acc_xy", float("nan"))
    return (f"robust eps {rob['eps']} " if rob else "clean ") + f"acc {100 * acc:.1f}%"


KIND = declare(StageKind("eval", 1, "evals", execute, "clean (or robust) test accuracy of a model", label=label,
                         task_name="evaluate", summary=summary))
