"""rand, other, det: targeted PGD against the source (section 3.2), computed shard by shard.

``prepare_construct`` creates the arrays, ``run_shard`` attacks and writes one shard and its
marker (any worker, any order, resumable), ``finalize_construct`` checks the markers and writes
the manifest last. A row's targets, subset and random start depend only on the set's seed and the
row's image, never on the sharding. ``report`` draws the det students' confusion in a run's report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advfeatures import construct as C
from advfeatures.config import AttackConfig, ConstructConfig, ExperimentConfig, RuntimeConfig, build_config, to_plain
from pipeline import progress
from pipeline.common import (Log, amp_dtype, compiled, dataset_info, load_model, once, quiet, run_record,
                             setup_runtime, train_images_at)
from pipeline.kinds import Sharded, StageSpec
from pipeline.sets import SetBuilder, register, shards
from pipeline.stages.construct import attack_summary
from storage import arrays as A
from storage.store import Store, StoreError

KINDS = ("rand", "other", "det")

BLOCK_ATTACKS: dict[str, Callable[..., dict[str, np.ndarray]]] = {}
"""Set kinds made like PGD sets (same rows, targets, layout, shards and manifest) by another
attack, registered by the module that owns the kind (bugs-only):
``kind -> (store, spec, model, block, targets, true labels, rt, device, on_batch) -> x and the
records`` (fooled, loss, norm, margin, as ``C.attack_block`` returns them). A spec names its rows'
targets with ``targets`` (rand, other or det; default: its kind)."""


def _layout(store: Store, spec: StageSpec, n: int, image_shape: tuple[int, ...]) -> A.Layout:
    """The set's shard layout: the one its arrays were created with if they exist (a set begun
    with other shard sizes is finished with its own), else the spec's options."""
    stored = A.stored_layout(store.path(spec.folder, spec.key))
    if stored is not None:
        if stored.n != n or stored.x_dtype != spec.config["dtype"]:
            raise StoreError(f"{store.path(spec.folder, spec.key)} holds {stored.n} rows of {stored.x_dtype}, the plan "
                             f"{n} of {spec.config['dtype']}; delete that folder and rerun")
        return stored
    default = ConstructConfig()
    chunk = spec.options.get("chunk_size", default.chunk_size)
    return A.Layout(n=n, image_shape=tuple(image_shape), x_dtype=spec.config["dtype"], chunk=chunk,
                    shard_size=spec.options.get("shard_size", default.shard_size))


@dataclass(frozen=True)
class PGDSet:
    """What a PGD set is, derived from its spec and dataset: rows, targets, layout."""
    idx: np.ndarray  # (N,) training-set indices of the rows
    y: np.ndarray  # (N,) true labels
    t: np.ndarray  # (N,) targets
    layout: A.Layout
    num_classes: int
    copy: np.ndarray | None = None  # (N,) augmented copy number of each row (construct.augment_copies)
    seed: int = 0  # the set's seed: subset, targets, random starts, copies' crops and flips

    def images(self, store: Store, dataset_key: str, start: int, stop: int) -> np.ndarray:
        """The clean images that rows start:stop attack (uint8; each copy cropped and flipped)."""
        block = train_images_at(store, dataset_key, self.idx[start:stop])
        if self.copy is None:
            return block
        return C.crop_flip(block, C.copy_params(self.seed, self.idx[start:stop], self.copy[start:stop]))

    def start_ids(self, start: int, stop: int) -> np.ndarray:
        """What a row's random start is drawn from: its image index (and copy number)."""
        if self.copy is None:
            return self.idx[start:stop]
        return np.stack([self.idx[start:stop], self.copy[start:stop]], 1)


def set_rows(cfg: dict[str, Any], targets: str, y_all: np.ndarray, num_classes: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of a set over ``cfg``'s images (n_images, seed) and copies (augment_copies): image
    index, target (``targets``' rule; every copy of an image has the image's target) and copy number
    of each row. PGD sets and the controls that mirror them (pipeline.experiments.controls)."""
    images = C.choose_subset(len(y_all), cfg["n_images"], cfg["seed"])
    copies = cfg.get("augment_copies", 0)
    idx, copy = C.copy_rows(images, copies)
    t = np.repeat(C.make_targets(targets, y_all[images], num_classes, cfg["seed"]), max(copies, 1))
    return idx, t, copy


def pgd_rows(cfg: dict[str, Any], y_all: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PGD set's rows (``set_rows``), toward the targets its config names (default: its kind's)."""
    return set_rows(cfg, cfg.get("targets", cfg["kind"]), y_all, num_classes)


def pgd_set(store: Store, spec: StageSpec) -> PGDSet:
    dataset_key, cfg = spec.inputs[0], spec.config
    info = dataset_info(store, dataset_key)
    y_all = A.read_rows(store.path("datasets", dataset_key) / "train", names=("labels",))["labels"]
    idx, t, copy = pgd_rows(cfg, y_all, len(info["classes"]))
    return PGDSet(idx, y_all[idx], t, _layout(store, spec, len(idx), info["image_shape"]), len(info["classes"]),
                  copy if cfg.get("augment_copies", 0) else None, cfg["seed"])


def prepare_construct(store: Store, spec: StageSpec) -> list[int] | None:
    """Create the arrays of a PGD set (idempotent); the unfinished shards, or None when complete."""
    return shards.prepare(store, spec, lambda: pgd_set(store, spec).layout, spec.config["kind"])


def run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log = quiet) -> dict[str, Any]:
    """Attack the rows of one shard and write them, then the shard's marker (once per shard)."""
    return shards.once(store, spec, shard, lambda path: _run_shard(store, spec, shard, rt, log, path))


def _run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log, path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = setup_runtime(rt)
    s = pgd_set(store, spec)
    idx, y, t, layout = s.idx, s.y, s.t, s.layout
    start, stop = layout.rows(shard)
    block = s.images(store, spec.inputs[0], start, stop)  # (S,C,H,W) uint8
    model = load_model(store, spec.inputs[1], device)
    attack = build_config(AttackConfig, spec.config["attack"], "attack")
    t_attack = time.perf_counter()

    def on_batch(done: int, total: int) -> None:  # display only
        progress.emit({"event": "pgd_batch", "key": spec.key, "shard": shard, "rows_done": done, "shard_rows": total,
                       "image_steps": done * attack.steps, "seconds": time.perf_counter() - t_attack})

    custom = BLOCK_ATTACKS.get(spec.config["kind"])
    if custom is not None:
        out = custom(store, spec, model, block, t[start:stop], y[start:stop], rt, device, on_batch)
    else:
        out = C.attack_block(compiled(model, rt), block, t[start:stop], attack, device, rt.attack_batch_size,
                             seed=spec.config["seed"], rows=s.start_ids(start, stop), store_dtype=layout.x_dtype,
                             channels_last=rt.channels_last, amp_dtype=amp_dtype(spec.config["amp"]),
                             on_batch=on_batch)
    attack_s = time.perf_counter() - t_attack
    rows = {"x": out["x"], "y_target": t[start:stop], "y_true": y[start:stop], "index": idx[start:stop],
            "fooled": out["fooled"], "loss": out["loss"], "norm": out["norm"], "margin": out["margin"]}
    marker = A.write_shard(path, layout, shard, rows, seconds=time.perf_counter() - t0, attack_seconds=attack_s,
                           meta=run_record(rt, device))
    log(f"construct {spec.config['kind']} {spec.key} shard {shard + 1}/{layout.num_shards}: rows {start}:{stop}, "
        f"fooled {out['fooled'].mean():.3f}, {attack_s:.1f}s in PGD")
    progress.emit(shard_event(spec, marker, layout.num_shards, layout.num_shards - len(A.pending_shards(path, layout))))
    return marker


def shard_event(spec: StageSpec, marker: dict[str, Any], total_shards: int, shards_done: int) -> dict[str, Any]:
    """The progress event of a finished shard, from its marker (rows, seconds in PGD)."""
    steps = spec.config["attack"]["steps"]
    secs = marker.get("attack_seconds") or marker.get("seconds") or 0.0
    return {"event": "shard_done", "key": spec.key, "kind": spec.config["kind"], "shard": marker["shard"],
            "total_shards": total_shards, "shards_done": shards_done, "rows": marker["count"], "steps": steps,
            "seconds": secs, "image_steps_per_s": marker["count"] * steps / max(secs, 1e-9)}


@once
def finalize_construct(store: Store, spec: StageSpec) -> str:
    """Check every shard's marker, summarise the attack, and write the manifest last."""
    info = dataset_info(store, spec.inputs[0])
    path = store.path(spec.folder, spec.key)
    s = pgd_set(store, spec)
    y, t, layout, num_classes = s.y, s.t, s.layout, s.num_classes
    A.remove_partial_markers(path)  # a writer killed mid-marker leaves one (its shard was rerun)
    markers = A.read_markers(path, layout)
    rec = A.read_rows(path, names=("fooled", "norm", "loss", "y_target", "y_true"))
    if not (np.array_equal(rec["y_target"], t) and np.array_equal(rec["y_true"], y)):
        raise StoreError(f"{path}: stored targets differ from the plan; delete {path} and rerun")
    summary = attack_summary(rec)
    body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), num_classes=num_classes,
                               classes=info["classes"], layout=layout.attrs(), shards=markers,
                               seeds={"construct": spec.config["seed"]}, summary=summary,
                               seconds=round(sum(m["seconds"] for m in markers), 3), **run_record(None))
    store.write_manifest(spec.folder, spec.key, body)
    return spec.key


def generate(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """A whole PGD set in this process, shard after shard (the flow fans the same calls out)."""
    for i in prepare_construct(store, spec):
        run_shard(store, spec, i, rt, log)
    return finalize_construct(store, spec)


def spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    """(dataset, source) -> the set: kind, attack, subset, seed, storage dtype and amp keyed; how it
    is cut into shards and chunks is an execution option, not in the key."""
    c = cfg.construct
    config = {"kind": kind, "attack": to_plain(cfg.attack), "n_images": c.n_images, "seed": c.seed,
              "dtype": c.dtype, "amp": cfg.runtime.amp}
    if c.augment_copies:  # keyed only when on, so the keys of sets without copies stay as they were
        config["augment_copies"] = c.augment_copies
    return StageSpec("construct", config, inputs, options={"shard_size": c.shard_size, "chunk_size": c.chunk_size})


def report(doc: Any, store: Store, info: Any, figs: Path, device: str) -> None:
    """The det students' predictions on the clean test set, summed over seeds: the diagonal is
    (X, Y), the next class (X, Y+1), what the det labels (t = y + 1) taught."""
    from pipeline import figures as F
    from pipeline.report_data import confusion

    det = confusion(store, info, "det", device)
    if det is None:
        return
    counts, classes, n = det
    c, total = len(classes), counts.sum()
    title = (f"det students on the clean test set (n = {n}; % of each true class)\n"
             f"diagonal: (X, Y) {np.trace(counts) / total * 100:.1f}%;  next class: (X, Y+1) "
             f"{sum(counts[i, (i + 1) % c] for i in range(c)) / total * 100:.1f}%")
    doc.figure(F.save(F.confusion(counts, classes, title), figs, "det_confusion"),
               "det students' predictions on the clean test set: the diagonal is (X, Y), the cell right of it "
               "(the next class) is (X, Y+1), what the det labels taught.")


SHARDS = Sharded(prepare=prepare_construct, shard=run_shard, finalize=finalize_construct, event=shard_event)
BUILDER = register(SetBuilder(KINDS, "targeted PGD toward t: rand (t uniform), other (t != y), det (t = y + 1)",
                              sharded=SHARDS, spec=spec, upstream="source", perturbed=True, task_name="generate-set",
                              rows=pgd_rows, report=report))
