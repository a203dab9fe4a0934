"""errors (Wallace 2019): training images, unmodified, relabelled with a teacher's prediction and
kept only where it is wrong."""

from __future__ import annotations

import time

import numpy as np
import torch

from advfeatures import construct as C
from advfeatures.config import ExperimentConfig
from advfeatures.training import predict
from pipeline.common import Context, dataset_info, load_model, load_split, once, run_record, save_set, setup_runtime
from pipeline.kinds import StageSpec
from pipeline.sets import SetBuilder, register
from storage.store import Store


@once
def build_errors(store: Store, spec: StageSpec, rt, log=lambda _m: None) -> str:
    """Training images, unmodified, relabelled with the teacher's prediction where it is wrong."""
    dataset_key, teacher_key = spec.inputs
    device = setup_runtime(rt)
    t0 = time.perf_counter()
    x, y = load_split(store, dataset_key, "train")
    info = dataset_info(store, dataset_key)
    model = load_model(store, teacher_key, device)
    pred = predict(model, torch.from_numpy(x), rt.eval_batch_size, device, rt.channels_last).numpy()
    idx, labels = C.select_errors(pred, y)
    if len(idx) == 0:
        raise ValueError(f"the teacher {teacher_key} makes no mistakes on the training set, so the errors set "
                         "is empty; train it less (teacher.train.epochs)")
    n = len(idx)
    rows = {"x": x[idx], "y_target": labels, "y_true": y[idx], "index": idx, "fooled": np.ones(n, bool),
            "loss": np.zeros(n, np.float32), "norm": np.zeros(n, np.float32),
            "margin": np.zeros(n, np.float32)}
    summary = {"n": n, "teacher_train_error": n / len(y), "attack_success": float("nan"),
               "attack_success_t_ne_y": float("nan"), "share_target_is_true": 0.0}
    save_set(store, spec, rows, info["classes"], summary, run_record(rt, device), t0,
             records_note="fooled/loss/norm/margin do not apply: images are unmodified")
    log(f"errors set {spec.key}: teacher wrong on {n} of {len(y)} training images")
    return spec.key


def spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    """(dataset, teacher) -> the whole training set through the teacher; images are not modified."""
    return StageSpec("construct", {"kind": "errors"}, inputs)


def build(store: Store, spec: StageSpec, ctx: Context) -> str:
    return build_errors(store, spec, ctx.runtime, ctx.log)


BUILDER = register(SetBuilder(("errors",), "a teacher's mistakes on the training set, with its wrong labels",
                              build=build, spec=spec, upstream="teacher", task_name="build-errors"))
