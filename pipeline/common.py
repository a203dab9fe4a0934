"""What every stage executor shares: the run context, runtime setup, run records, the
once-per-key guard (lock, re-check, compute), publishing (stage, manifest last, publish), and
reading inputs by key (datasets, models, constructed sets, each checked against its checksums).
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advfeatures.archs import unkeyed
from advfeatures.checkpoints import restore
from advfeatures.config import ConfigError, DataConfig, ModelConfig, RuntimeConfig, build_config, to_plain
from advfeatures.cpus import usable_cpus
from advfeatures.models import build_model
from pipeline.kinds import StageSpec
from storage import arrays as A
from storage.store import IntegrityError, Store, atomic_write_json

Log = Callable[[str], None]


def quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class Context:
    """What an executor is run with besides its spec: runtime settings, the data source (for
    ingestion) and where progress lines go."""
    runtime: RuntimeConfig
    data: DataConfig | None = None
    log: Log = quiet
    plan: Any = None
    """The plan a run stage tabulates (``pipeline.plan.Plan``)."""
    config: Any = None
    """The resolved ``ExperimentConfig`` (written beside a run's table)."""
    experiment: str = "replicate"
    """The experiment whose writer makes a run stage's tables (``pipeline.experiments``)."""


def device_of(rt: RuntimeConfig) -> torch.device:
    if rt.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(rt.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={rt.device!r} but CUDA is not available; use runtime.device=auto or cpu")
    return dev


def setup_runtime(rt: RuntimeConfig) -> torch.device:
    # threads = 0: the CPUs this process may use (affinity, cgroup quota), not the host's cores
    want = rt.threads or usable_cpus()
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    dev = device_of(rt)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark
    if dev.type == "cpu" and rt.amp == "bf16" and not cpu_has_fast_bf16():
        warnings.warn(SLOW_BF16, RuntimeWarning, stacklevel=2)
    return dev


SLOW_BF16 = ("runtime.amp=bf16 on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): autocast is emulated "
             "and trains small_cnn about 10x slower than fp32 (measured on an AVX2 AMD EPYC: 101 vs 1,085 "
             "images/s). Use --set runtime.amp=none (amp is keyed: its stages get new keys)")


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume emulated
        return False


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


_OUTCOME = threading.local()


def last_outcome() -> str:
    """'cached' or 'computed': what the last ``once`` stage of this thread did (the Prefect tasks
    show a stage found in the store as Cached)."""
    return getattr(_OUTCOME, "value", "computed")


def _record(outcome: str) -> None:
    _OUTCOME.value = outcome


def once(stage: Callable[..., str]) -> Callable[..., str]:
    """Run a stage ``stage(store, spec, ...)`` unless its artifact is complete: the store's truth
    is checked once per stage, under the store's lock for its key, so concurrent runs compute it
    once and the others find it complete."""
    def run(store: Store, spec: StageSpec, *args: Any, **kwargs: Any) -> str:
        with store.lock(spec.folder, spec.key):
            if store.is_complete(spec.folder, spec.key):
                _record("cached")
                return spec.key
            out = stage(store, spec, *args, **kwargs)
        _record("computed")
        return out

    run.__name__, run.__doc__ = stage.__name__, stage.__doc__
    return run


def publish(store: Store, spec: StageSpec, t0: float, write: Callable[[Path], dict[str, Any]] | None = None,
            **fields: Any) -> None:
    """Stage an artifact in a temporary folder, write its files (``write(tmp)`` returns extra
    manifest fields), then its manifest last (``fields``, the seconds since ``t0`` unless given),
    and publish the folder atomically: a reader sees a complete artifact or none."""
    with store.staging(spec.folder, spec.key) as tmp:
        extra = write(tmp) if write is not None else {}
        fields.setdefault("seconds", round(time.perf_counter() - t0, 3))
        body = store.manifest_body(spec.folder, spec.key, spec.as_dict(), **fields, **extra)
        atomic_write_json(tmp / "manifest.json", body)


def load_split(store: Store, dataset_key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    return A.read_split(store.path("datasets", dataset_key), split)


def train_images_at(store: Store, dataset_key: str, idx: np.ndarray) -> np.ndarray:
    """The training images at indices ``idx`` (any order, repeats allowed), each chunk read once."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    return A.read_images(store.path("datasets", dataset_key), "train", uniq)[inverse]


def dataset_info(store: Store, dataset_key: str) -> dict[str, Any]:
    return store.manifest("datasets", dataset_key)


def verified_set(store: Store, key: str, names: tuple[str, ...] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A constructed set's manifest and rows (``names``, default all), after re-checking every
    shard against its marker's checksum: a corrupt set raises instead of feeding a later stage."""
    cman = store.manifest("constructed", key)
    problems = A.verify_shards(store.path("constructed", key), cman["shards"])
    if problems:
        raise IntegrityError(f"constructed/{key} is corrupt ({describe(problems)}); run "
                             f"`advfeatures verify {key} --repair`, then rerun to regenerate those shards")
    return cman, A.read_rows(store.path("constructed", key), names=names)


def load_model(store: Store, key: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    man = store.manifest("models", key)
    blob = (store.path("models", key) / "weights.pt").read_bytes()  # read once: hashed, then loaded
    if "weights_sha256" in man and hashlib.sha256(blob).hexdigest() != man["weights_sha256"]:
        raise IntegrityError(f"models/{key}/weights.pt does not match its manifest's sha256; "
                             f"run `advfeatures verify {key} --repair` and rerun to retrain it")
    mc = build_config(ModelConfig, unkeyed(man["stage"]["config"]["model"]), "model")
    if man.get("format") in ("torchscript", "robustbench"):  # read from such a checkpoint (advfeatures.checkpoints)
        return restore(blob, man["format"], mc.mean, mc.std).to(device).eval()
    model = build_model(mc.arch, man["num_classes"], mc.mean, mc.std)
    model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    return model.to(device).eval()


def save_set(store: Store, spec: StageSpec, rows: dict[str, np.ndarray], classes: list[str],
             summary: dict[str, Any], record: dict[str, Any], t0: float, **extra: Any) -> None:
    """Write a whole constructed set (every field of ``A.CONSTRUCTED_FIELDS``, x, and any fields of
    the kind's own, which become the layout's extra fields) as one shard, staged, manifest last:
    for sets computed at once (errors; sets made elsewhere)."""
    n, chunk = len(rows["y_target"]), 1024
    own = tuple((k, str(v.dtype)) for k, v in rows.items() if k != "x" and k not in A.CONSTRUCTED_FIELDS)
    layout = A.Layout(n=n, image_shape=tuple(rows["x"].shape[1:]), x_dtype=str(rows["x"].dtype), chunk=chunk,
                      shard_size=-(-n // chunk) * chunk, extra=own)

    def write(tmp: Path) -> dict[str, Any]:
        A.create_constructed(tmp, layout)
        return {"shards": [A.write_shard(tmp, layout, 0, rows, seconds=time.perf_counter() - t0, meta=record)]}

    publish(store, spec, t0, write, **record, num_classes=len(classes), classes=classes, layout=layout.attrs(),
            summary=summary, **extra)


def describe(problems: list[dict]) -> str:
    return "; ".join(f"shard {p['shard']} rows {p['start']}:{p['stop']}: {p['problem']}" for p in problems[:5])


