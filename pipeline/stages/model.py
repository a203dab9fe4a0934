"""model: a source or teacher trained on the clean training set. ``fit_and_save`` is shared with
the student kind: fresh initial weights from the spec's derived seed, ``fit``, weights + manifest."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeatures import checkpoints
from advfeatures.archs import check_same_module, kind_of, unkeyed
from advfeatures.config import ModelConfig, RuntimeConfig, TrainConfig, build_config
from advfeatures.models import build_model
from advfeatures.training import confusion_matrix, fit, predict
from pipeline import progress
from pipeline.common import (
    Context,
    Log,
    amp_dtype,
    compiled,
    dataset_info,
    load_split,
    once,
    publish,
    quiet,
    run_record,
    setup_runtime,
    state_sha256,
)
from pipeline.kinds import StageKind, StageSpec, declare
from storage.hashing import path_sha256
from storage.store import Store

_GLOBAL_RNG = threading.Lock()  # layers draw their initial weights from torch's global generator


def initial_model(spec: StageSpec, num_classes: int) -> torch.nn.Module:
    """A model stage's initial weights, drawn on the CPU from the seed its spec derives from the
    model's role and seed (``spec.config['seeds']['init']``). Under a lock: two stages building
    models at once in one process (runtime.stage_workers) would otherwise reseed each other."""
    check_same_module(spec.config["model"], f"{spec.stage} {spec.key}")
    mc = build_config(ModelConfig, unkeyed(spec.config["model"]), "model")
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.config["seeds"]["init"])
        return build_model(mc.arch, num_classes, mc.mean, mc.std)


def fit_and_save(store: Store, spec: StageSpec, x: np.ndarray, y: np.ndarray, num_classes: int,
                 rt: RuntimeConfig, log: Log, extra: dict[str, Any]) -> str:
    device = setup_runtime(rt)
    train_cfg = build_config(TrainConfig, spec.config["train"], "train")
    seeds = spec.config["seeds"]
    model = initial_model(spec, num_classes)
    init_sha = state_sha256(model)

    tracked = test_tracker(store, spec, model, num_classes, rt, device)

    def on_epoch(ev: dict) -> None:  # fit's callback: a log line, a progress event, the tracked test accuracy
        if tracked is not None:
            tracked(ev)
        log(f"{spec.stage} {spec.key} epoch {ev['epoch']}/{ev['epochs']}: loss {ev['train_loss']:.3f} "
            f"acc {ev['train_acc']:.3f} ({ev['seconds']:.1f}s)")
        progress.emit({"event": "epoch", "stage": spec.stage, "key": spec.key, **ev})

    res = fit(model, torch.from_numpy(x), torch.from_numpy(y), train_cfg, device=device,
              channels_last=rt.channels_last, callback=on_epoch, amp_dtype=amp_dtype(spec.config["amp"]),
              forward=compiled(model, rt), seed=seeds["data"],
              drop_single=kind_of(spec.config["model"]["arch"]) != "registry")  # the registry's keep their results

    def write(tmp: Path) -> dict[str, Any]:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with (tmp / "weights.pt").open("wb") as f:
            torch.save(state, f)
        return {"weights_sha256": path_sha256(tmp / "weights.pt")}

    publish(store, spec, time.perf_counter(), write, num_classes=num_classes, init_sha256=init_sha,
            n_train=int(len(y)), seeds={"train": train_cfg.seed, **seeds}, history=res.history,
            seconds=round(res.seconds, 3), images_per_second=round(res.images_per_second, 1),
            **run_record(rt, device), **extra)
    return spec.key


def test_tracker(store: Store, spec: StageSpec, model: torch.nn.Module, num_classes: int, rt: RuntimeConfig,
                 device: torch.device) -> Any:
    """With ``track_test`` in the spec's config (keyed: the manifest's history gains it), after
    every epoch the model's confusion counts on the clean test set of the dataset named by the
    spec's last input are added to the epoch's history entry (``test_confusion``, with
    ``test_acc``), so a table can show the peak over epochs as well as the end. Evaluating in
    between does not change the training (no random numbers drawn; batch norm statistics are not
    updated in eval mode)."""
    if not spec.config.get("track_test"):
        return None
    x, y = load_split(store, spec.inputs[-1], "test")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def track(ev: dict[str, Any]) -> None:
        with torch.no_grad():
            pred = predict(model, xt, rt.eval_batch_size, device, rt.channels_last)
        conf = confusion_matrix(pred, yt, num_classes)
        ev["test_confusion"] = conf
        ev["test_acc"] = float(np.trace(np.asarray(conf))) / len(y)

    return track


@once
def train_model(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """Source or teacher: a model trained on the clean training set of ``spec.inputs[0]``, or read
    from its checkpoint (``import_checkpoint``)."""
    (dataset_key,) = spec.inputs
    if "checkpoint" in spec.config:
        return import_checkpoint(store, spec, rt, log)
    x, y = load_split(store, dataset_key, "train")
    classes = dataset_info(store, dataset_key)["classes"]
    return fit_and_save(store, spec, x, y, len(classes), rt, log, {})


def import_checkpoint(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """A trained model read from the file of ``spec.options['checkpoint']`` (``advfeatures.checkpoints``),
    checked against the sha256 its key holds, stored like a trained one (TorchScript as TorchScript)."""
    t0 = time.perf_counter()
    (dataset_key,) = spec.inputs
    classes = dataset_info(store, dataset_key)["classes"]
    mc = build_config(ModelConfig, unkeyed(spec.config["model"]), "model")
    opts = spec.options
    model, info = checkpoints.load(opts.get("checkpoint", ""), mc.arch, len(classes), mc.mean, mc.std,
                                   opts.get("setting", spec.config["role"]), bool(opts.get("trusted")))
    if info["sha256"] != spec.config["checkpoint"]["sha256"]:
        raise checkpoints.CheckpointError(f"{info['file']} changed since this run was planned (sha256 "
                                          f"{info['sha256'][:12]}, planned {spec.config['checkpoint']['sha256'][:12]}); rerun")

    def write(tmp: Path) -> dict[str, Any]:
        with (tmp / "weights.pt").open("wb") as f:
            checkpoints.save(model, info["format"], f)
        return {"weights_sha256": path_sha256(tmp / "weights.pt")}

    log(f"{spec.stage} {spec.key}: {spec.config['role']} read from {info['file']} ({info['format']})")
    publish(store, spec, t0, write, num_classes=len(classes), format=info["format"], checkpoint=info, n_train=0,
            seeds={"train": None}, history=[], **run_record(rt))
    return spec.key


def check_models(cfg: Any, num_classes: int) -> None:
    """Before any work: every architecture the config names that is not a registered one (timm,
    a user's module) builds and runs on one 32x32 image with ``num_classes`` outputs, and every
    checkpoint it names loads into its architecture. Raises ConfigError, one line."""
    from advfeatures.archs import ArchError, archs_named, check_runs
    from advfeatures.config import ConfigError, to_plain

    for arch, where in archs_named(to_plain(cfg)).items():
        if kind_of(arch) == "robustbench":
            continue  # a trained model: checked with the checkpoints below
        try:
            check_runs(arch, num_classes, where=where)
        except ArchError as e:
            raise ConfigError(str(e)) from None
    stages = [("source", cfg.source), ("teacher", cfg.teacher)]
    rd = getattr(cfg, "robust_datasets", None)
    if rd is not None and rd.checkpoint:
        arch = rd.checkpoint_arch or cfg.source.model.arch
        stages.append(("robust_datasets", ModelConfig(arch, cfg.source.model.mean, cfg.source.model.std)))
    for setting, stage in stages:
        mc, path, trusted = (stage, rd.checkpoint, rd.checkpoint_trusted) if setting == "robust_datasets" else \
            (stage.model, stage.checkpoint, stage.checkpoint_trusted)
        if path is not None or kind_of(mc.arch) == "robustbench":
            checkpoints.load(path or "", mc.arch, num_classes, mc.mean, mc.std, setting, trusted)


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    return train_model(store, spec, ctx.runtime, ctx.log)


def verify_weights(store: Store, key: str, man: dict[str, Any]) -> tuple[list[str], list[int]]:
    """weights.pt against its sha256 in the manifest (models and students)."""
    weights = store.path("models", key) / "weights.pt"
    if not weights.is_file() or path_sha256(weights) != man.get("weights_sha256"):
        return ["weights.pt is missing or does not match its sha256"], []
    return [], []


def label(spec: dict[str, Any], labels: dict[str, str]) -> str:
    c = spec["config"]
    if "checkpoint" in c:
        return f"{c.get('role', 'model')} from checkpoint {c['checkpoint']['sha256'][:8]}"
    ep = c.get("train", {}).get("epochs")
    return c.get("role", "model") + (f" {ep} ep" if c.get("role") == "teacher" else "")


def trained_summary(who: str, man: dict[str, Any]) -> str:
    """``ls``: who the model is, its architecture, epochs and seed."""
    c = man["stage"]["config"]
    t = c.get("train", {})
    return f"{who}, {c.get('model', {}).get('arch')}, {t.get('epochs')} ep, seed {t.get('seed')}"


# Bumps: 2: initial weights and data order seeded from the model's role and seed (no student shares
# the source's init); random numbers drawn on the CPU; amp in the key.
KIND = declare(StageKind("model", 2, "models", execute, "a source or teacher trained on clean data", label=label,
                         verify=verify_weights, task_name="train-model", events=("epoch",),
                         summary=lambda man: trained_summary(man["stage"]["config"].get("role", "model"), man)))
