"""Trained models read from a file instead of trained (``source.checkpoint``, ``teacher.checkpoint``,
``robust_datasets.checkpoint``), in the formats people have:

- ``state_dict``: a state dict of the configured ``model.arch`` (optionally under ``state_dict`` or
  ``model``, or with DataParallel's ``module.`` prefix), or of this project's normalised model
  (``net.*``, ``mean``, ``std``: a store's weights.pt);
- ``torchscript``: a ``torch.jit.save`` file (``torch.jit.load``), wrapped in ``model.mean``/``std``;
- ``robustness``: the robustness library's ``{"model": ..., "epoch": ...}``, whose ``model`` holds
  ``module.model.<layer>`` (the classifier), ``module.attacker.model.<layer>`` (the same weights) and
  ``module.normalizer.new_mean``/``new_std`` (3x1x1, used as the model's normalisation);
- ``robustbench``: ``model.arch: robustbench/<name>``, robustbench's own loader on a local folder.

Files are read with ``torch.load(weights_only=True)``; one that needs full unpickling (which runs
code from the file) is refused unless the setting's ``_trusted`` flag says the file is trusted.
Every failure is a ``CheckpointError`` of one line, raised before any work (``check``).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfeatures.archs import ArchError, build_net, kind_of, robustbench_name
from advfeatures.config import ConfigError
from advfeatures.models import Normalized

ROBUSTNESS_MODEL, ROBUSTNESS_NORM = "module.model.", "module.normalizer."
_SHA: dict[tuple[str, int, int], str] = {}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as configured; the message names the setting and the fix."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within a process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[memo] = h.hexdigest()
    return _SHA[memo]


def weights_file(path: str, arch: str, setting: str) -> Path:
    """The file whose bytes identify the trained model (robustbench: its weights in the folder)."""
    if kind_of(arch) == "robustbench":
        threat, name = _robustbench(arch, setting)
        folder = Path(path or "models").expanduser()
        f = folder / "cifar10" / threat / f"{name}.pt"
        if not f.is_file():
            raise CheckpointError(f"{setting}.model.arch={arch!r}: no weights at {f} (robustbench looks for "
                                  f"<model_dir>/cifar10/<threat>/<name>.pt, model_dir = {setting}.checkpoint, default "
                                  "./models); download them there first, e.g. with robustbench.utils.load_model")
        return f
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{setting}.checkpoint={path}: no such file")
    return p


def _robustbench(arch: str, setting: str) -> tuple[str, str]:
    try:
        return robustbench_name(arch, f"{setting}.model.arch")
    except ArchError as e:
        raise CheckpointError(str(e)) from None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip holding ``<name>/code/`` and ``constants.pkl``), not a torch.save one."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in zf.namelist())


def read(path: Path, setting: str, trusted: bool) -> tuple[str, Any]:
    """('torchscript', a ScriptModule) or ('pickle', what torch.load returns)."""
    if is_torchscript(path):
        try:
            return "torchscript", torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - in one line
            raise CheckpointError(f"{setting}.checkpoint={path}: not a loadable TorchScript file ({_first(e)})") from None
    try:
        return "pickle", torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trusted:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it holds {found.group(1)})" if found else ""
            raise CheckpointError(f"{setting}.checkpoint={path} needs full unpickling{what}, which can run code from "
                                  f"the file; if you trust it, set {setting}.checkpoint_trusted=true") from None
    except Exception as e:  # noqa: BLE001 - a file torch cannot read at all
        raise CheckpointError(f"{setting}.checkpoint={path}: not a torch checkpoint ({_first(e)})") from None
    try:
        return "pickle", torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - e.g. a dill pickle without dill, a class that no longer imports
        raise CheckpointError(f"{setting}.checkpoint={path}: unpickling fails ({_first(e)})") from None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _tensors(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def state_of(obj: Any) -> tuple[str, dict[str, torch.Tensor], tuple[Sequence[float], Sequence[float]] | None]:
    """(format, the network's state dict, the checkpoint's own (mean, std) or None)."""
    inner = obj.get("model", obj.get("state_dict")) if isinstance(obj, dict) else None
    sd = inner if isinstance(inner, dict) else obj
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"holds a {type(obj).__name__} without a state dict (tensors by name) in it")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(ROBUSTNESS_MODEL) for k in sd):
        net = {k[len(ROBUSTNESS_MODEL):]: v for k, v in sd.items() if k.startswith(ROBUSTNESS_MODEL)}
        norm = None
        if f"{ROBUSTNESS_NORM}new_mean" in sd:
            norm = (sd[f"{ROBUSTNESS_NORM}new_mean"].flatten().tolist(), sd[f"{ROBUSTNESS_NORM}new_std"].flatten().tolist())
        return "robustness", net, norm
    if all(k.startswith("module.") for k in sd):  # DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "mean" in sd and "std" in sd and any(k.startswith("net.") for k in sd):  # a Normalized model's own
        net = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
        return "state_dict", net, (sd["mean"].flatten().tolist(), sd["std"].flatten().tolist())
    return "state_dict", sd, None


def fit(net: nn.Module, sd: dict[str, torch.Tensor], where: str, arch: str, fmt: str) -> None:
    """Load ``sd`` into ``net`` by name; a key that does not fit is named (first missing, first
    unexpected), so is a shape that differs. BatchNorm's ``num_batches_tracked`` may be absent."""
    want = net.state_dict()
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (first: {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else [])
        hint = "; a robustness-library checkpoint needs model.arch=robustness_resnet50 (or _resnet18)" \
            if fmt == "robustness" and not arch.startswith("robustness_") else ""
        raise CheckpointError(f"{where}'s keys do not fit model.arch={arch}: {', '.join(parts)}{hint}")
    bad = [(k, tuple(v.shape), tuple(want[k].shape)) for k, v in sd.items() if tuple(v.shape) != tuple(want[k].shape)]
    if bad:
        k, got, need = bad[0]
        raise CheckpointError(f"{where}: {k} has shape {got}, model.arch={arch} needs {need} ({len(bad)} tensors "
                              "differ; is the number of classes the data's?)")
    net.load_state_dict(sd, strict=False)


def load(path: str, arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float], setting: str,
         trusted: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of ``setting``'s checkpoint, in eval mode, taking [0, 1] images, and what
    it is: ``{"format", "sha256", "file", "mean", "std"}``."""
    f = weights_file(path, arch, setting)
    info: dict[str, Any] = {"file": str(f), "sha256": file_sha256(f)}
    where = f"{setting}.checkpoint={path}"
    if kind_of(arch) == "robustbench":
        threat, name = _robustbench(arch, setting)
        from robustbench.utils import load_model as rb_load  # noqa: PLC0415 - optional

        net = rb_load(model_name=name, dataset="cifar10", threat_model=threat, model_dir=str(Path(path or "models")))
        model = Normalized(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # robustbench models normalise inside
        return model.eval(), {**info, "format": "robustbench", "mean": [0.0] * 3, "std": [1.0] * 3}
    fmt, obj = read(f, setting, trusted)
    if fmt == "torchscript":
        model = Normalized(obj, mean, std)
        _check_logits(model, num_classes, where)
        return model.eval(), {**info, "format": fmt, "mean": list(mean), "std": list(std)}
    try:
        fmt, sd, norm = state_of(obj)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    mean, std = norm if norm is not None else (mean, std)
    try:
        net = build_net(arch, num_classes, f"{setting}.model.arch")
    except ArchError as e:
        raise CheckpointError(str(e)) from None
    fit(net, sd, where, arch, fmt)
    model = Normalized(net, mean, std)
    return model.eval(), {**info, "format": fmt, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _check_logits(model: nn.Module, num_classes: int, where: str) -> None:
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, 32, 32))
    except Exception as e:  # noqa: BLE001 - in one line
        raise CheckpointError(f"{where}: the model fails on a 1x3x32x32 image ({_first(e)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        raise CheckpointError(f"{where}: the model gives {getattr(out, 'shape', type(out).__name__)} for one image, "
                              f"not (1, {num_classes}) logits (the data's classes)")


def save(model: nn.Module, fmt: str, f: Any) -> None:
    """Store a loaded model: TorchScript as TorchScript (the network; the normalisation is
    ``model.mean``/``std``), robustbench's as a whole module, the rest as this project's state dict."""
    if fmt == "torchscript":
        torch.jit.save(model.net, f)
    elif fmt == "robustbench":
        torch.save(model, f)
    else:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f)


def restore(blob: bytes, fmt: str, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """A stored non-state-dict model (``save``): the store's own files, written by this code."""
    import io

    if fmt == "torchscript":
        return Normalized(torch.jit.load(io.BytesIO(blob), map_location="cpu"), mean, std)
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)  # robustbench: our own file
