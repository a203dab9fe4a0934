"""construct: the constructed training sets. PGD sets (rand, other, det; section 3.2) are sharded:
``prepare_construct`` creates the arrays, ``run_shard`` attacks and writes one shard and its marker
(any worker, any order, resumable), ``finalize_construct`` checks the markers and writes the
manifest last. The errors set (Wallace 2019) is the teacher's mistakes on unmodified images,
written at once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeatures import construct as C
from advfeatures.attacks import threat_model
from advfeatures.config import CONTROL_KINDS, PGD_KINDS, AttackConfig, ConstructConfig, RuntimeConfig, build_config
from advfeatures.training import predict, to_unit
from pipeline import progress
from pipeline.common import (
    Context,
    Log,
    amp_dtype,
    compiled,
    dataset_info,
    load_model,
    load_split,
    once,
    quiet,
    run_record,
    save_set,
    setup_runtime,
)
from pipeline.kinds import StageSpec
from storage import arrays as A
from storage.store import Store, StoreError


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
        uniq, inverse = np.unique(self.idx[start:stop], return_inverse=True)
        block = A.read_images(store.path("datasets", dataset_key), "train", uniq)[inverse]
        if self.copy is None:
            return block
        return C.crop_flip(block, C.copy_params(self.seed, self.idx[start:stop], self.copy[start:stop]))

    def start_ids(self, start: int, stop: int) -> np.ndarray:
        """What a row's random start is drawn from: its image index (and copy number)."""
        if self.copy is None:
            return self.idx[start:stop]
        return np.stack([self.idx[start:stop], self.copy[start:stop]], 1)


def pgd_set(store: Store, spec: StageSpec) -> PGDSet:
    dataset_key, cfg = spec.inputs[0], spec.config
    info = dataset_info(store, dataset_key)
    y_all = A.read_rows(store.path("datasets", dataset_key) / "train", names=("labels",))["labels"]
    images = C.choose_subset(len(y_all), cfg["n_images"], cfg["seed"])
    t_images = C.make_targets(cfg["kind"], y_all[images], len(info["classes"]), cfg["seed"])
    copies = cfg.get("augment_copies", 0)
    idx, copy = C.copy_rows(images, copies)
    t = np.repeat(t_images, max(copies, 1))  # every copy of an image has the image's target
    return PGDSet(idx, y_all[idx], t, _layout(store, spec, len(idx), info["image_shape"]), len(info["classes"]),
                  copy if copies else None, cfg["seed"])


def prepare_construct(store: Store, spec: StageSpec) -> list[int]:
    """Create the arrays of a PGD set (idempotent); return the indices of unfinished shards."""
    if store.is_complete(spec.folder, spec.key):
        return []
    store.ensure_writable()
    layout, path = pgd_set(store, spec).layout, store.path(spec.folder, spec.key)

    def create() -> list[int]:
        A.create_constructed(path, layout)
        return A.pending_shards(path, layout)

    pending = store.once(spec.folder, spec.key, lambda: store.is_complete(spec.folder, spec.key), create, skipped=[])
    if pending:
        progress.emit({"event": "pgd_set", "key": spec.key, "kind": spec.config["kind"],
                       "rows": sum(b - a for a, b in map(layout.rows, pending)), "shards": len(pending),
                       "total_shards": layout.num_shards})
    return pending


def run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log = quiet) -> dict[str, Any]:
    """Attack the rows of one shard and write them, then the shard's marker. Skips finished shards;
    the per-shard lock means one writer per shard, ever."""
    path = store.path(spec.folder, spec.key)
    return store.once(spec.folder, f"{spec.key}-shard{shard}",
                      lambda: store.is_complete(spec.folder, spec.key) or A.shard_done(path, shard),
                      lambda: _run_shard(store, spec, shard, rt, log, path), skipped={"shard": shard, "skipped": True})


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

    out = C.attack_block(compiled(model, rt), block, t[start:stop], attack, device, rt.attack_batch_size,
                         seed=spec.config["seed"], rows=s.start_ids(start, stop), store_dtype=layout.x_dtype,
                         channels_last=rt.channels_last, amp_dtype=amp_dtype(spec.config["amp"]), on_batch=on_batch)
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


def attack_summary(rec: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fooling rate (the source predicts the target on the stored image) over all rows and over
    the rows whose target differs from the true label (for rand, ~1/C of rows have t = y and are
    "fooled" for free), with the perturbation norms and target losses."""
    differ = rec["y_target"] != rec["y_true"]
    return {"n": int(len(differ)), "attack_success": float(rec["fooled"].mean()),
            "attack_success_t_ne_y": float(rec["fooled"][differ].mean()) if differ.any() else float("nan"),
            "n_t_ne_y": int(differ.sum()), "mean_norm": float(rec["norm"].mean()),
            "max_norm": float(rec["norm"].max()), "mean_target_loss": float(rec["loss"].mean()),
            "share_target_is_true": float(1 - differ.mean())}


@once
def finalize_construct(store: Store, spec: StageSpec) -> str:
    """Check every shard's marker, summarise the attack, and write the manifest last."""
    info = dataset_info(store, spec.inputs[0])
    path = store.path(spec.folder, spec.key)
    s = pgd_set(store, spec)
    y, t, layout, num_classes = s.y, s.t, s.layout, s.num_classes
    markers = A.read_markers(path, layout)
    rec = A.read_rows(path, names=("fooled", "norm", "loss", "y_target", "y_true"))
    if not (np.array_equal(rec["y_target"], t) and np.array_equal(rec["y_true"], y)):
        raise StoreError(f"{path}: stored targets differ from the plan; delete {path} and rerun")
    summary = attack_summary(rec)
    body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), num_classes=num_classes,
                               classes=info["classes"], layout=dict(vars(layout)), shards=markers,
                               seeds={"construct": spec.config["seed"]}, summary=summary,
                               seconds=round(sum(m["seconds"] for m in markers), 3), **run_record(None))
    store.write_manifest(spec.folder, spec.key, body)
    return spec.key


def generate(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """A whole PGD set in this process, shard after shard (the flow fans the same calls out)."""
    for i in prepare_construct(store, spec):
        run_shard(store, spec, i, rt, log)
    return finalize_construct(store, spec)




@once
def build_errors(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
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





# --- controls: no PGD -----------------------------------------------------------------------------------

@once
def build_control(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = quiet) -> str:
    """leak-K: the rows and targets of set K (same subset and seed), each image plus one fixed
    random pattern of norm eps per target class (clipped to [0, 1]); with ``keep_t_eq_y``, rows
    whose target is their own label stay unperturbed. rand-clean-only: D_rand's rows whose target
    is their own label, unperturbed. Records (fooled, loss, norm, margin) under the source, on the
    stored images, as for PGD sets, so margin selection applies to controls alike."""
    dataset_key, source_key = spec.inputs
    cfg, kind = spec.config, spec.config["kind"]
    device = setup_runtime(rt)
    t0 = time.perf_counter()
    info = dataset_info(store, dataset_key)
    num_classes = len(info["classes"])
    x_all, y_all = load_split(store, dataset_key, "train")
    idx = C.choose_subset(len(y_all), cfg["n_images"], cfg["seed"])
    t = C.make_targets(kind, y_all[idx], num_classes, cfg["seed"])
    if kind == "rand-clean-only":
        keep = t == y_all[idx]
        idx, t = idx[keep], t[keep]
    norm, eps = cfg.get("norm", "l2"), cfg.get("eps", 0.0)
    patterns = C.leak_patterns(num_classes, tuple(info["image_shape"]), norm, eps, cfg["seed"]) \
        if kind.startswith("leak-") else None
    threat = threat_model(norm, max(eps, 1e-12))
    model = load_model(store, source_key, device)
    sdtype = getattr(torch, cfg["dtype"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "fooled", "loss", "norm", "margin")}
    for s in range(0, len(idx), rt.eval_batch_size):
        x0 = to_unit(torch.from_numpy(x_all[idx[s:s + rt.eval_batch_size]]))
        tb = torch.from_numpy(t[s:s + rt.eval_batch_size])
        x = x0.clone()
        if patterns is not None:
            same = tb == torch.from_numpy(y_all[idx[s:s + rt.eval_batch_size]])
            x = C.add_leak(x0, tb, patterns, same if cfg.get("keep_t_eq_y") else None)
        xs, rec = C.stored_records(model, x0.to(device), x.to(device), tb.to(device), threat, sdtype)
        out["x"].append(xs.to(sdtype).cpu().numpy())
        for k, v in rec.items():
            out[k].append(v.cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    rows = {**arrays, "y_target": t, "y_true": y_all[idx], "index": idx}
    summary = attack_summary(rows)
    save_set(store, spec, rows, info["classes"], summary, run_record(rt, device), t0,
             seeds={"construct": cfg["seed"]})
    log(f"control {kind} {spec.key}: {len(idx)} rows, the source predicts the target on "
        f"{summary['attack_success']:.3f}")
    return spec.key


# --- released sets (imported) ----------------------------------------------------------------------------

@once
def import_released(store: Store, spec: StageSpec, rt: RuntimeConfig | None = None, log: Log = quiet) -> str:
    """A released dataset (``CIFAR_ims``/``CIFAR_lab``: torch-saved lists of tensors, concatenated)
    as a constructed set, after checking the files still have the sha256 in the key and that the
    images and labels fit the dataset (shape, [0, 1], classes)."""
    from storage.hashing import path_sha256

    (dataset_key,) = spec.inputs
    folder = Path(spec.options.get("path", ""))
    t0 = time.perf_counter()
    for name, sha in spec.config["sha256"].items():
        if not (folder / name).is_file() or path_sha256(folder / name) != sha:
            raise StoreError(f"{folder / name} is missing or changed since the plan was made (its sha256 is in "
                             f"the key); rerun to plan with the files as they are now")
    info = dataset_info(store, dataset_key)

    def load(name: str) -> torch.Tensor:
        items = torch.load(folder / name, map_location="cpu", weights_only=True)
        return torch.cat(list(items)) if isinstance(items, (list, tuple)) else items

    x, y = load("CIFAR_ims").float(), load("CIFAR_lab").long().reshape(-1)
    where = f"released set {folder}"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(info["image_shape"]) or len(x) != len(y):
        raise StoreError(f"{where}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not fit the dataset's "
                         f"(N, {', '.join(map(str, info['image_shape']))}) images with N labels")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise StoreError(f"{where}: images must be floats in [0, 1], "
                         f"found [{float(x.min()):.3f}, {float(x.max()):.3f}]")
    if int(y.min()) < 0 or int(y.max()) >= len(info["classes"]):
        raise StoreError(f"{where}: labels must be 0..{len(info['classes']) - 1}, found {int(y.min())}..{int(y.max())}")
    n = len(y)
    nan = np.full(n, np.nan, np.float32)
    rows = {"x": x.to(getattr(torch, spec.config["dtype"])).numpy(), "y_target": y.numpy(),
            "y_true": np.full(n, -1, np.int64), "index": np.full(n, -1, np.int64), "fooled": np.zeros(n, bool),
            "loss": nan, "norm": nan, "margin": nan}
    summary = {"n": n, "attack_success": float("nan"), "attack_success_t_ne_y": float("nan"),
               "share_target_is_true": float("nan"), "released": spec.config["name"]}
    save_set(store, spec, rows, info["classes"], summary, run_record(rt), t0, source_folder=str(folder),
             records_note="released set: true labels and attack records are not part of the release")
    log(f"imported released set {spec.config['name']}: {n} rows")
    return spec.key


def is_sharded(spec: StageSpec) -> bool:
    """A PGD set, built shard by shard (the flow fans its shards out)."""
    return spec.stage == "construct" and spec.config["kind"] in PGD_KINDS


def execute(store: Store, spec: StageSpec, ctx: Context) -> str:
    if spec.config["kind"] == "errors":
        return build_errors(store, spec, ctx.runtime, ctx.log)
    if spec.config["kind"] in CONTROL_KINDS:
        return build_control(store, spec, ctx.runtime, ctx.log)
    if spec.config["kind"] == "released":
        return import_released(store, spec, ctx.runtime, ctx.log)
    return generate(store, spec, ctx.runtime, ctx.log)
