"""Stage executors: the bodies that Prefect tasks wrap, usable without Prefect.

Each one: return early if its artifact is complete -> load inputs by key -> call the library ->
write through ``storage`` (staged or sharded, manifest last) -> return its key. Arguments are
keys, specs and configs only; tensors never cross a stage boundary.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeatures import construct as C
from advfeatures import data as D
from advfeatures.config import (
    AttackConfig, ConfigError, ConstructConfig, DataConfig, ModelConfig, RuntimeConfig, TrainConfig, build_config,
    to_plain,
)
from advfeatures.models import build_model
from advfeatures.plan import FOLDER, StageSpec
from advfeatures.training import accuracy_metrics, fit, predict
from storage import arrays as A
from storage.hashing import path_sha256
from storage.store import IntegrityError, Store, StoreError, atomic_write_json

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def device_of(rt: RuntimeConfig) -> torch.device:
    if rt.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(rt.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={rt.device!r} but CUDA is not available; use runtime.device=auto or cpu")
    return dev


def setup_runtime(rt: RuntimeConfig) -> torch.device:
    if rt.threads:
        torch.set_num_threads(rt.threads)
    dev = device_of(rt)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
    return dev


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a stage's keyed ``amp`` setting ('bf16' or 'none')."""
    return torch.bfloat16 if amp == "bf16" else None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware that produced an artifact (recorded, never keyed)."""
    import platform

    import zarr

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "zarr": zarr.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_record(rt: RuntimeConfig | None, device: torch.device | None = None) -> dict[str, Any]:
    """What every manifest and shard marker records about how it was computed."""
    return {"runtime": to_plain(rt) if rt is not None else None, "environment": environment(device)}


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes, values): equal iff the weights are equal."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compiled(model: torch.nn.Module, rt: RuntimeConfig) -> torch.nn.Module:
    """The model itself, or a torch.compile wrapper of it (weights shared) when runtime.compile."""
    return torch.compile(model) if rt.compile else model


def _once(stage: Callable[..., str]) -> Callable[..., str]:
    """Run a stage ``stage(store, spec, ...)`` unless its artifact is complete, under the store's
    lock for its key, re-checking after the lock: concurrent runs compute it once."""
    def run(store: Store, spec: StageSpec, *args: Any, **kwargs: Any) -> str:
        return store.once(spec.folder, spec.key, lambda: store.is_complete(spec.folder, spec.key),
                          lambda: stage(store, spec, *args, **kwargs), skipped=spec.key)

    run.__name__, run.__doc__ = stage.__name__, stage.__doc__
    return run


# --- dataset ---------------------------------------------------------------------------------------

def locate_source(data: DataConfig) -> Path:
    """The local file or folder to ingest; downloads with torchvision when source='torchvision'."""
    if data.source == "torchvision":
        tgz = Path(data.download_root).expanduser() / "cifar-10-python.tar.gz"
        return tgz if tgz.is_file() else D.download_torchvision(data.download_root)
    path = D.locate(data.source)
    D.reader_for(path)  # fails early, with the expected layout, on an unsupported source
    return path


def ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log = _quiet) -> str:
    return _once(lambda st, sp: _ingest(st, data, sp, log))(store, spec)


def _ingest(store: Store, data: DataConfig, spec: StageSpec, log: Log) -> str:
    path = locate_source(data)
    t0 = time.perf_counter()
    raw = D.read_source(path)
    attrs = {"classes": raw.classes, "source_sha256": spec.config["source_sha256"],
             "content_sha256": raw.content_sha256(), "source_name": path.name}
    with store.staging(spec.folder, spec.key) as tmp:
        A.write_dataset(tmp, {"train": (raw.train.images, raw.train.labels),
                              "test": (raw.test.images, raw.test.labels)}, attrs)
        body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), **attrs, **run_record(None),
                                   n_train=len(raw.train.labels), n_test=len(raw.test.labels),
                                   image_shape=list(raw.train.images.shape[1:]),
                                   seconds=round(time.perf_counter() - t0, 3))
        atomic_write_json(tmp / "manifest.json", body)
    log(f"ingested {path.name}: {len(raw.train.labels)} train / {len(raw.test.labels)} test images")
    return spec.key


def load_split(store: Store, dataset_key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    return A.read_split(store.path("datasets", dataset_key), split)


def dataset_info(store: Store, dataset_key: str) -> dict[str, Any]:
    return store.manifest("datasets", dataset_key)


# --- models ---------------------------------------------------------------------------------------------

def initial_model(spec: StageSpec, num_classes: int) -> torch.nn.Module:
    """A model stage's initial weights, drawn on the CPU from the seed its spec derives from the
    model's role and seed (``spec.config['seeds']['init']``)."""
    mc = build_config(ModelConfig, spec.config["model"], "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.config["seeds"]["init"])
        return build_model(mc.arch, num_classes, mc.mean, mc.std)


def _fit_and_save(store: Store, spec: StageSpec, x: np.ndarray, y: np.ndarray, num_classes: int,
                  rt: RuntimeConfig, log: Log, extra: dict[str, Any]) -> str:
    device = setup_runtime(rt)
    train_cfg = build_config(TrainConfig, spec.config["train"], "train")
    seeds = spec.config["seeds"]
    model = initial_model(spec, num_classes)
    init_sha = state_sha256(model)

    def progress(ev: dict) -> None:
        log(f"{spec.stage} {spec.key} epoch {ev['epoch']}/{ev['epochs']}: loss {ev['train_loss']:.3f} "
            f"acc {ev['train_acc']:.3f} ({ev['seconds']:.1f}s)")

    res = fit(model, torch.from_numpy(x), torch.from_numpy(y), train_cfg, device=device,
              channels_last=rt.channels_last, callback=progress, amp_dtype=amp_dtype(spec.config["amp"]),
              forward=compiled(model, rt), seed=seeds["data"])
    with store.staging(spec.folder, spec.key) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with (tmp / "weights.pt").open("wb") as f:
            torch.save(state, f)
        body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), num_classes=num_classes,
                                   weights_sha256=path_sha256(tmp / "weights.pt"), init_sha256=init_sha,
                                   n_train=int(len(y)), seeds={"train": train_cfg.seed, **seeds}, history=res.history,
                                   seconds=round(res.seconds, 3), images_per_second=round(res.images_per_second, 1),
                                   **run_record(rt, device), **extra)
        atomic_write_json(tmp / "manifest.json", body)
    return spec.key


@_once
def train_model(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = _quiet) -> str:
    """Source or teacher: a model trained on the clean training set of ``spec.inputs[0]``."""
    (dataset_key,) = spec.inputs
    x, y = load_split(store, dataset_key, "train")
    classes = dataset_info(store, dataset_key)["classes"]
    return _fit_and_save(store, spec, x, y, len(classes), rt, log, {})


def verified_set(store: Store, key: str, names: tuple[str, ...] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A constructed set's manifest and rows (``names``, default all), after re-checking every
    shard against its marker's checksum: a corrupt set raises instead of feeding a later stage."""
    cman = store.manifest("constructed", key)
    problems = A.verify_shards(store.path("constructed", key), cman["shards"])
    if problems:
        raise IntegrityError(f"constructed/{key} is corrupt ({_describe(problems)}); run "
                             f"`advfeatures verify {key} --repair`, then rerun to regenerate those shards")
    return cman, A.read_rows(store.path("constructed", key), names=names)


@_once
def train_student(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = _quiet) -> str:
    """A fresh model trained only on the constructed set ``spec.inputs[0]`` (x, y_target)."""
    (construct_key,) = spec.inputs
    cman, rows = verified_set(store, construct_key, names=("x", "y_target"))
    return _fit_and_save(store, spec, rows["x"], rows["y_target"], cman["num_classes"], rt, log,
                         {"construct_kind": spec.config["set"]})


def load_model(store: Store, key: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    man = store.manifest("models", key)
    blob = (store.path("models", key) / "weights.pt").read_bytes()  # read once: hashed, then loaded
    if "weights_sha256" in man and hashlib.sha256(blob).hexdigest() != man["weights_sha256"]:
        raise IntegrityError(f"models/{key}/weights.pt does not match its manifest's sha256; "
                             f"run `advfeatures verify {key} --repair` and rerun to retrain it")
    mc = build_config(ModelConfig, man["stage"]["config"]["model"], "model")
    model = build_model(mc.arch, man["num_classes"], mc.mean, mc.std)
    model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    return model.to(device).eval()


# --- evaluation ---------------------------------------------------------------------------------------

@_once
def evaluate(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = _quiet) -> str:
    """Clean test accuracy of model inputs[0] on dataset inputs[1]: on (X, Y) and on (X, Y+1)."""
    model_key, dataset_key = spec.inputs
    device = setup_runtime(rt)
    x, y = load_split(store, dataset_key, "test")
    num_classes = len(dataset_info(store, dataset_key)["classes"])
    model = load_model(store, model_key, device)
    t0 = time.perf_counter()
    pred = predict(model, torch.from_numpy(x), rt.eval_batch_size, device, rt.channels_last)
    metrics = accuracy_metrics(pred, torch.from_numpy(y), num_classes)
    with store.staging(spec.folder, spec.key) as tmp:
        body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), metrics=metrics,
                                   seconds=round(time.perf_counter() - t0, 3), **run_record(rt, device))
        atomic_write_json(tmp / "manifest.json", body)
    log(f"eval {model_key}: acc(X,Y) {metrics['acc_xy']:.4f}  acc(X,Y+1) {metrics['acc_xy1']:.4f}")
    return spec.key


# --- constructed sets: PGD, sharded -----------------------------------------------------------------

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

    return store.once(spec.folder, spec.key, lambda: store.is_complete(spec.folder, spec.key), create, skipped=[])


def run_shard(store: Store, spec: StageSpec, shard: int, rt: RuntimeConfig, log: Log = _quiet) -> dict[str, Any]:
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
    out = C.attack_block(compiled(model, rt), block, t[start:stop], attack, device, rt.attack_batch_size,
                         seed=spec.config["seed"], rows=s.start_ids(start, stop), store_dtype=layout.x_dtype,
                         channels_last=rt.channels_last, amp_dtype=amp_dtype(spec.config["amp"]))
    attack_s = time.perf_counter() - t_attack
    rows = {"x": out["x"], "y_target": t[start:stop], "y_true": y[start:stop], "index": idx[start:stop],
            "fooled": out["fooled"], "loss": out["loss"], "norm": out["norm"], "margin": out["margin"]}
    marker = A.write_shard(path, layout, shard, rows, seconds=time.perf_counter() - t0, attack_seconds=attack_s,
                           meta=run_record(rt, device))
    log(f"construct {spec.config['kind']} {spec.key} shard {shard + 1}/{layout.num_shards}: rows {start}:{stop}, "
        f"fooled {out['fooled'].mean():.3f}, {attack_s:.1f}s in PGD")
    return marker


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


@_once
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


def generate(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = _quiet) -> str:
    """A whole PGD set in this process, shard after shard (the flow fans the same calls out)."""
    for i in prepare_construct(store, spec):
        run_shard(store, spec, i, rt, log)
    return finalize_construct(store, spec)


# --- margin selection ----------------------------------------------------------------------------------

@_once
def select_rows(store: Store, spec: StageSpec, rt: RuntimeConfig | None = None, log: Log = _quiet) -> str:
    """The ``fraction`` of a PGD set's rows with the largest target margin under the source (the
    ``margin`` record, computed on the stored images), in their original order, as a set of its own.
    The fraction is taken separately among rows with t = y and t != y, so selection does not change
    their shares (rand)."""
    (construct_key, _source_key), fraction = spec.inputs, spec.config["fraction"]
    t0 = time.perf_counter()
    cman, rows = verified_set(store, construct_key)
    keep = C.select_by_margin(rows["margin"], fraction, strata=rows["y_target"] == rows["y_true"])
    kept = {k: v[keep] for k, v in rows.items()}
    summary = {**attack_summary(kept), "fraction": fraction, "n_parent": int(len(rows["margin"])),
               "min_margin_kept": float(kept["margin"].min()),
               "attack_success_parent": cman["summary"]["attack_success"]}
    save_set(store, spec, kept, cman["classes"], summary, run_record(rt), t0, parent=construct_key,
             seeds=cman.get("seeds", {}))
    log(f"selected {len(keep)} of {len(rows['margin'])} rows of {construct_key} by target margin "
        f"(>= {summary['min_margin_kept']:.3f}); fooled {summary['attack_success']:.3f}")
    return spec.key


# --- constructed sets: errors (Wallace) --------------------------------------------------------------

def save_set(store: Store, spec: StageSpec, rows: dict[str, np.ndarray], classes: list[str],
             summary: dict[str, Any], record: dict[str, Any], t0: float, **extra: Any) -> None:
    """Write a whole constructed set (every field of ``A.CONSTRUCTED_FIELDS`` and x) as one shard,
    staged, manifest last: for sets computed at once (errors; sets made elsewhere)."""
    n, chunk = len(rows["y_target"]), 1024
    layout = A.Layout(n=n, image_shape=tuple(rows["x"].shape[1:]), x_dtype=str(rows["x"].dtype), chunk=chunk,
                      shard_size=-(-n // chunk) * chunk)
    with store.staging(spec.folder, spec.key) as tmp:
        A.create_constructed(tmp, layout)
        marker = A.write_shard(tmp, layout, 0, rows, seconds=time.perf_counter() - t0, meta=record)
        body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), **record, num_classes=len(classes),
                                   classes=classes, layout=dict(vars(layout)), shards=[marker], summary=summary,
                                   seconds=round(time.perf_counter() - t0, 3), **extra)
        atomic_write_json(tmp / "manifest.json", body)


@_once
def build_errors(store: Store, spec: StageSpec, rt: RuntimeConfig, log: Log = _quiet) -> str:
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



# --- integrity ------------------------------------------------------------------------------------------

def _describe(problems: list[dict]) -> str:
    return "; ".join(f"shard {p['shard']} rows {p['start']}:{p['stop']}: {p['problem']}" for p in problems[:5])


def find(store: Store, key: str) -> str:
    """The store folder holding artifact ``key``."""
    for folder in dict.fromkeys(FOLDER.values()):
        if store.path(folder, key).is_dir():
            return folder
    raise StoreError(f"no artifact {key!r} in the store at {store.root}; `advfeatures show-config` lists keys")


def verify(store: Store, key: str, repair: bool = False) -> list[str]:
    """Check an artifact against the checksums in its manifest; [] when intact.

    datasets: the arrays' content sha256; models: weights.pt's sha256; constructed sets: every
    shard's rows against its marker. With ``repair``, a corrupt artifact is unsealed (manifest
    removed, and for constructed sets only the bad shards' markers), so the next run recomputes
    exactly what is broken.
    """
    folder = find(store, key)
    path = store.path(folder, key)
    if not store.is_complete(folder, key):
        return [f"{folder}/{key} is unfinished (no manifest); the next run completes it"]
    man = store.manifest(folder, key)
    problems: list[str] = []
    bad_shards: list[int] = []
    if folder == "datasets":
        try:
            raw = D.RawDataset(*(D.Split(*A.read_split(path, s)) for s in ("train", "test")), man["classes"])
            if raw.content_sha256() != man["content_sha256"]:
                problems.append("dataset arrays do not match their content sha256")
        except Exception as e:  # noqa: BLE001 - undecodable chunks
            problems.append(f"dataset arrays unreadable ({type(e).__name__}: {e})")
    elif folder == "models":
        weights = path / "weights.pt"
        if not weights.is_file() or path_sha256(weights) != man.get("weights_sha256"):
            problems.append("weights.pt is missing or does not match its sha256")
    elif folder == "constructed":
        found = A.verify_shards(path, man["shards"])
        bad_shards = [p["shard"] for p in found]
        problems += [f"shard {p['shard']} rows {p['start']}:{p['stop']}: {p['problem']}" for p in found]
    if problems and repair:
        for i in bad_shards:
            A.marker_path(path, i).unlink(missing_ok=True)
        (path / "manifest.json").unlink()
    return problems
