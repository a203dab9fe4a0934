"""inversion: the robust and non-robust training sets of section 3.1 (Ilyas et al. 2019), computed
shard by shard like the PGD sets (the same protocol: prepare, any shard on any worker, finalize).

For each goal image x (a seeded subset of the training set, label y) the row starts from another
training image x0, drawn from the set's seed independently of y, and ``advfeatures.inversion``
moves it until its penultimate representation matches x's (normalised-gradient L2 steps, clamped
to [0, 1]; within ``radius`` of x0 when keyed: Li et al.'s D_NR variant). The row is x_r with
label y. With a robust model this is D_R, with a standard one D_NR: which model is the spec's
second input, so the two share this builder and differ in their keys by that input.

A row's fields: x (x_r as stored), y_target (the goal's label: what students learn), y_true and
index (the start image's label and index: what x_r was made from), fooled / loss / margin (the
model on the stored x_r toward y_target), norm (||x_r - x0||_2), and the kind's own fields goal
(the goal's index), start_distance and distance (||g(x0) - g(x)|| and ||g(x_r) - g(x)||).
The model is frozen (input gradients only) under ``runtime.amp`` when keyed; it is not compiled
(inversion reads the representation with a forward hook).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advfeatures import construct as C
from advfeatures.config import ConstructConfig, RuntimeConfig
from pipeline import progress
from pipeline.common import (Log, amp_dtype, dataset_info, load_model, once, quiet, run_record, setup_runtime,
                             train_images_at)
from pipeline.kinds import Sharded, StageSpec
from pipeline.sets import SetBuilder, register, shards
from storage import arrays as A
from storage.store import Store, StoreError

KIND = "inversion"
EXTRA = (("goal", "int64"), ("start_distance", "float32"), ("distance", "float32"))


@dataclass(frozen=True)
class InversionSet:
    """What an inversion set is, from its spec and dataset: goals, starts, labels, layout."""
    goal: np.ndarray  # (N,) training-set indices of the goal images
    start: np.ndarray  # (N,) training-set indices of the start images
    y: np.ndarray  # (N,) the goals' labels (the rows' labels)
    y_start: np.ndarray  # (N,) the starts' labels
    layout: A.Layout
    num_classes: int


def _layout(store: Store, spec: StageSpec, n: int, image_shape: tuple[int, ...]) -> A.Layout:
    stored = A.stored_layout(store.path(spec.folder, spec.key))
    if stored is not None:
        if stored.n != n or stored.x_dtype != spec.config["dtype"] or stored.extra != EXTRA:
            raise StoreError(f"{store.path(spec.folder, spec.key)} holds another layout ({stored.n} rows of "
                             f"{stored.x_dtype}) than the plan ({n} of {spec.config['dtype']}); delete that folder "
                             "and rerun")
        return stored
    default = ConstructConfig()
    return A.Layout(n=n, image_shape=tuple(image_shape), x_dtype=spec.config["dtype"],
                    chunk=spec.options.get("chunk_size", default.chunk_size),
                    shard_size=spec.options.get("shard_size", default.shard_size), extra=EXTRA)


def inversion_set(store: Store, spec: StageSpec) -> InversionSet:
    dataset_key, cfg = spec.inputs[0], spec.config
    info = dataset_info(store, dataset_key)
    y_all = A.read_rows(store.path("datasets", dataset_key) / "train", names=("labels",))["labels"]
    goal = C.choose_subset(len(y_all), cfg["n_images"], cfg["seed"])
    start = C.inversion_starts(goal, len(y_all), cfg["seed"])
    return InversionSet(goal, start, y_all[goal], y_all[start], _layout(store, spec, len(goal), info["image_shape"]),
                        len(info["classes"]))


def prepare(store: Store, spec: StageSpec) -> list[int] | None:
    """Create the set's arrays (idempotent); the unfinished shards, or None when it is complete."""
    return shards.prepare(store, spec, lambda: inversion_set(store, spec).layout, KIND)


def run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log = quiet) -> dict[str, Any]:
    return shards.once(store, spec, shard, lambda path: _run_shard(store, spec, shard, rt, log, path))


def _run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log, path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = setup_runtime(rt)
    s = inversion_set(store, spec)
    start, stop = s.layout.rows(shard)
    cfg = spec.config
    goals = train_images_at(store, spec.inputs[0], s.goal[start:stop])
    starts = train_images_at(store, spec.inputs[0], s.start[start:stop])
    model = load_model(store, spec.inputs[1], device)
    t_inv = time.perf_counter()

    def on_batch(done: int, total: int) -> None:  # display only
        progress.emit({"event": "pgd_batch", "key": spec.key, "shard": shard, "rows_done": done, "shard_rows": total,
                       "image_steps": done * cfg["steps"], "seconds": time.perf_counter() - t_inv})

    at = trace_steps(cfg["steps"])
    out = C.invert_block(model, goals, starts, s.y[start:stop], cfg["steps"], cfg["step_size"], cfg.get("radius"),
                         device, rt.attack_batch_size, amp_dtype(cfg["amp"]), s.layout.x_dtype, rt.channels_last,
                         on_batch, trace_at=at)
    seconds = time.perf_counter() - t_inv
    ratio = out["trace"] / np.maximum(out["start_distance"], 1e-12)[:, None]  # (n, K)
    trace = {"steps": list(at), "ratio_sum": [float(v) for v in ratio.sum(0)], "count": int(len(ratio))}
    rows = {"x": out["x"], "y_target": s.y[start:stop], "y_true": s.y_start[start:stop],
            "index": s.start[start:stop], "goal": s.goal[start:stop],
            **{k: out[k] for k in ("fooled", "loss", "norm", "margin", "start_distance", "distance")}}
    marker = A.write_shard(path, s.layout, shard, rows, seconds=time.perf_counter() - t0, attack_seconds=seconds,
                           meta={**run_record(rt, device), "ratio_trace": trace})
    log(f"construct {KIND} {spec.key} shard {shard + 1}/{s.layout.num_shards}: rows {start}:{stop}, "
        f"distance {out['start_distance'].mean():.2f} -> {out['distance'].mean():.2f}, {seconds:.1f}s")
    progress.emit(shard_event(spec, marker, s.layout.num_shards,
                              s.layout.num_shards - len(A.pending_shards(path, s.layout))))
    return marker


def shard_event(spec: StageSpec, marker: dict[str, Any], total_shards: int, shards_done: int) -> dict[str, Any]:
    steps = spec.config["steps"]
    secs = marker.get("attack_seconds") or marker.get("seconds") or 0.0
    return {"event": "shard_done", "key": spec.key, "kind": KIND, "shard": marker["shard"],
            "total_shards": total_shards, "shards_done": shards_done, "rows": marker["count"], "steps": steps,
            "seconds": secs, "image_steps_per_s": marker["count"] * steps / max(secs, 1e-9)}


def trace_steps(steps: int) -> tuple[int, ...]:
    """The step counts at which a shard records its rows' distance ratio: every tenth of the run
    (and 0), so the summary shows where the inversion stops improving."""
    return tuple(sorted({round(steps * k / 10) for k in range(11)}))


def ratio_trace(markers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rows' mean distance ratio ||g(x_r) - g(x)|| / ||g(x0) - g(x)|| after each traced step
    count, over every shard (None for shards written before traces were recorded), and the
    plateau figure: the fall of that mean over the last fifth of the steps."""
    traces = [m.get("ratio_trace") for m in markers]
    if not traces or any(t is None for t in traces):
        return None
    steps, n = traces[0]["steps"], sum(t["count"] for t in traces)
    mean = [sum(t["ratio_sum"][k] for t in traces) / n for k in range(len(steps))]
    at = {s: m for s, m in zip(steps, mean)}
    four_fifths = min(steps, key=lambda s: abs(s - 0.8 * steps[-1]))
    return {"steps": steps, "mean_ratio": [round(m, 5) for m in mean],
            "fall_last_fifth": round(at[four_fifths] - at[steps[-1]], 5)}


def summarise(rec: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far the inversion went: representation distances before and after (mean, and the
    median of their ratio), image distance from the start, and how often the model classifies
    x_r as its label (the goal's) or as its start's."""
    ratio = rec["distance"] / np.maximum(rec["start_distance"], 1e-12)
    return {"n": int(len(ratio)), "attack_success": float(rec["fooled"].mean()),
            "attack_success_t_ne_y": float(rec["fooled"][rec["y_target"] != rec["y_true"]].mean())
            if (rec["y_target"] != rec["y_true"]).any() else float("nan"),
            "share_target_is_true": float((rec["y_target"] == rec["y_true"]).mean()),
            "mean_norm": float(rec["norm"].mean()), "max_norm": float(rec["norm"].max()),
            "mean_target_loss": float(rec["loss"].mean()),
            "mean_start_distance": float(rec["start_distance"].mean()),
            "mean_distance": float(rec["distance"].mean()), "median_distance_ratio": float(np.median(ratio))}


@once
def finalize(store: Store, spec: StageSpec) -> str:
    """Check every shard's marker and rows' labels, summarise, and write the manifest last."""
    info = dataset_info(store, spec.inputs[0])
    path = store.path(spec.folder, spec.key)
    s = inversion_set(store, spec)
    A.remove_partial_markers(path)  # a writer killed mid-marker leaves one (its shard was rerun)
    markers = A.read_markers(path, s.layout)
    rec = A.read_rows(path, names=("y_target", "y_true", "goal", "index", "fooled", "loss", "norm", "distance",
                                   "start_distance"))
    if not (np.array_equal(rec["goal"], s.goal) and np.array_equal(rec["index"], s.start)
            and np.array_equal(rec["y_target"], s.y)):
        raise StoreError(f"{path}: stored goals, starts or labels differ from the plan; delete {path} and rerun")
    body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), num_classes=s.num_classes,
                               classes=info["classes"], layout=s.layout.attrs(), shards=markers,
                               seeds={"construct": spec.config["seed"]},
                               summary={**summarise(rec), "ratio_trace": ratio_trace(markers)},
                               seconds=round(sum(m["seconds"] for m in markers), 3), **run_record(None))
    store.write_manifest(spec.folder, spec.key, body)
    return spec.key


def spec(dataset_key: str, model_key: str, steps: int, step_size: float, n_images: int, seed: int, dtype: str,
         amp: str, radius: float | None = None, shard_size: int | None = None,
         chunk_size: int | None = None) -> StageSpec:
    """(dataset, model) -> the inversion set: steps, step size, radius (keyed only when set),
    goal subset, seed, storage dtype and amp keyed; shards and chunks are execution options."""
    config = {"kind": KIND, "steps": steps, "step_size": step_size, "n_images": n_images, "seed": seed,
              "dtype": dtype, "amp": amp}
    if radius is not None:
        config["radius"] = radius
    default = ConstructConfig()
    return StageSpec("construct", config, (dataset_key, model_key),
                     options={"shard_size": shard_size or default.shard_size,
                              "chunk_size": chunk_size or default.chunk_size})


SHARDS = Sharded(prepare=prepare, shard=run_shard, finalize=finalize, event=shard_event)
BUILDER = register(SetBuilder((KIND,), "representation inversion from another training image toward a goal's "
                                       "representation, labelled with the goal's label (D_R, D_NR; section 3.1)",
                              sharded=SHARDS, plannable=False, selectable=False, perturbed=True,
                              task_name="generate-set"))
