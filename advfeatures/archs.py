"""Architectures named by a string, wherever a model is named (``model.arch``, ``student.per_set.<set>.arch``,
``transfer.archs``, ...):

- a registered name (``advfeatures.models.MODELS``), e.g. ``resnet18``, ``robustness_resnet50``;
- ``timm/<name>``: ``timm.create_model(name, num_classes=K, pretrained=False)`` (the optional extra
  ``advfeatures[timm]``), run at the data's size (32x32);
- ``package.module:factory``: a user's own model, ``factory(num_classes) -> nn.Module``; the sha256
  of the module's source file is keyed (``keyed``), so editing it recomputes what depends on it;
- ``robustbench/<name>`` or ``robustbench/<threat>/<name>``: a trained RobustBench CIFAR-10 model,
  loaded by robustbench's own loader from a local folder (sources only; ``advfeatures.checkpoints``).

Every form is wrapped in the project's normalisation (``models.Normalized``): inputs stay in [0, 1].
Cheap checks (the name exists, the module imports) run when a config is built; ``check_runs`` builds
the model and passes one zero image through it, before any work.

Also here: ``robustness_resnet50`` (and ``_resnet18``), the CIFAR ResNets of MadryLab/robustness
layer for layer, so the library's checkpoints load into them by name.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from advfeatures.models import MODELS, BasicBlock, Bottleneck, register

TIMM, ROBUSTBENCH = "timm/", "robustbench/"
FORMS = ("a registered name", "timm/<name>", "package.module:factory", "robustbench/<name>")
KEY_ONLY = ("module_sha256",)
"""Fields a model's keyed config carries beyond ``ModelConfig``'s (``keyed``)."""


class ArchError(ValueError):
    """An architecture string that cannot be built; the message names the setting and the fix."""


# ---------------------------------------------------------------------------------------------
# The robustness library's CIFAR ResNets (robustness/cifar_models/resnet.py), same parameter names:
# the registry's blocks already name theirs as that library does (conv1..3, bn1..3, shortcut.0/1;
# an identity shortcut holds no parameters), only the network around them differs


class RobustnessResNet(nn.Module):
    """conv1 3x3 stride 1 (64), bn1, no max-pool; layer1..4 at widths 64/128/256/512 (strides
    1, 2, 2, 2); average pool 4; ``linear``. (B,3,32,32) -> 64@32 -> 128e@16 -> 256e@8 -> 512e@4 -> fc."""

    def __init__(self, block: type, num_blocks: Sequence[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)  # 4x4 -> 1x1 at 32x32 inputs, as the library does
        return self.linear(out.view(out.size(0), -1))


@register("robustness_resnet50")
def robustness_resnet50(num_classes: int = 10) -> nn.Module:
    """The robustness library's CIFAR ResNet-50 (Bottleneck [3, 4, 6, 3], 23.5 M parameters): its
    released checkpoints (e.g. the L2 eps 0.5 model of section 3.1) load into it."""
    return RobustnessResNet(Bottleneck, (3, 4, 6, 3), num_classes)


@register("robustness_resnet18")
def robustness_resnet18(num_classes: int = 10) -> nn.Module:
    """The robustness library's CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], 11.2 M parameters)."""
    return RobustnessResNet(BasicBlock, (2, 2, 2, 2), num_classes)


# ---------------------------------------------------------------------------------------------
# Resolving a string


def kind_of(arch: str) -> str:
    """'registry', 'timm', 'module' or 'robustbench'."""
    if arch.startswith(TIMM):
        return "timm"
    if arch.startswith(ROBUSTBENCH):
        return "robustbench"
    if ":" in arch:
        return "module"
    return "registry"


def check(arch: str, where: str = "model.arch") -> None:
    """Cheap checks when a config is built: the name is registered, timm has it, the module imports
    and has the factory, robustbench is installed. Raises ArchError (one line)."""
    kind = kind_of(arch)
    if kind == "registry":
        if arch not in MODELS:
            close = difflib.get_close_matches(arch, list(MODELS), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ArchError(f"{where}={arch!r} is unknown; {hint}choose one of {sorted(MODELS)}, timm/<name> or "
                            "package.module:factory")
    elif kind == "timm":
        _timm_name(arch, where)
    elif kind == "module":
        factory_of(arch, where)
    else:
        robustbench_name(arch, where)


def _timm(where: str, arch: str) -> Any:
    try:
        import timm
    except ImportError:
        raise ArchError(f"{where}={arch!r} needs timm, which is not installed: pip install 'advfeatures[timm]' "
                        "(or pip install timm)") from None
    return timm


def _timm_name(arch: str, where: str) -> str:
    name = arch[len(TIMM):]
    timm = _timm(where, arch)
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM + c for c in close)}?" if close else \
            "; timm.list_models('<pattern>*') lists its names"
        raise ArchError(f"{where}={arch!r}: timm {timm.__version__} has no model {name!r}{hint}")
    return name


def _module_parts(arch: str, where: str) -> tuple[str, str]:
    mod, _, attr = arch.partition(":")
    if not mod or not attr or not all(p.isidentifier() for p in mod.split(".")) or not attr.isidentifier():
        raise ArchError(f"{where}={arch!r} is not package.module:factory (e.g. mymodels.net:build)")
    return mod, attr


def _with_cwd() -> None:
    """The current folder importable, as for `python -m` (a console script's sys.path lacks it)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def module_file(arch: str, where: str = "model.arch") -> Path:
    """The source file of a ``package.module:factory`` arch's module (found, not imported)."""
    mod, _ = _module_parts(arch, where)
    _with_cwd()
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError) as e:
        spec, why = None, f" ({e})"
    else:
        why = ""
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ArchError(f"{where}={arch!r}: cannot import module {mod!r}{why}; it must be importable from the "
                        f"current folder ({Path.cwd()}) or PYTHONPATH")
    return Path(spec.origin)


def factory_of(arch: str, where: str = "model.arch") -> Callable[[int], nn.Module]:
    mod, attr = _module_parts(arch, where)
    module_file(arch, where)
    try:
        module = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - any error of the user's module, in one line
        raise ArchError(f"{where}={arch!r}: importing {mod} fails: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchError(f"{where}={arch!r}: module {mod} has no callable {attr!r} (factory(num_classes) -> nn.Module)")
    return factory


def module_sha256(arch: str) -> str | None:
    """sha256 of a user module's source file (None for other forms): edits change the key."""
    if kind_of(arch) != "module":
        return None
    return hashlib.sha256(module_file(arch).read_bytes()).hexdigest()


def robustbench_name(arch: str, where: str = "model.arch") -> tuple[str, str]:
    """(threat model, name) of ``robustbench/[<threat>/]<name>`` (threat default L2)."""
    parts = arch[len(ROBUSTBENCH):].split("/")
    threat, name = (parts[0], parts[1]) if len(parts) == 2 else ("L2", parts[0])
    if not name or threat not in ("L2", "Linf", "corruptions") or len(parts) > 2:
        raise ArchError(f"{where}={arch!r} is not robustbench/<name> or robustbench/<L2|Linf>/<name>")
    try:
        importlib.import_module("robustbench.utils")
    except Exception as e:  # noqa: BLE001 - absent, or installed without what it imports (pkg_resources)
        why = "is not installed" if isinstance(e, ModuleNotFoundError) and e.name == "robustbench" else \
            f"does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise ArchError(f"{where}={arch!r} needs the robustbench package, which {why}: pip install "
                        "git+https://github.com/RobustBench/robustbench.git (it then loads the weights from a local "
                        "folder, source.checkpoint, default ./models)") from None
    return threat, name


def build_net(arch: str, num_classes: int, where: str = "model.arch") -> nn.Module:
    """The bare network of ``arch`` (before normalisation), fresh initial weights."""
    kind = kind_of(arch)
    if kind == "registry":
        check(arch, where)
        return MODELS[arch](num_classes)
    if kind == "timm":
        name = _timm_name(arch, where)
        return _timm(where, arch).create_model(name, num_classes=num_classes, pretrained=False)
    if kind == "module":
        net = factory_of(arch, where)(num_classes)
        if not isinstance(net, nn.Module):
            raise ArchError(f"{where}={arch!r} returned {type(net).__name__}, not a torch.nn.Module")
        return net
    raise ArchError(f"{where}={arch!r} is a trained RobustBench model: name it as the source's model.arch "
                    "(it is loaded, not trained)")


def keyed(model: dict[str, Any]) -> dict[str, Any]:
    """A model section as a stage keys it: a user module's file sha256 added (``module_sha256``)."""
    sha = module_sha256(model["arch"])
    return {**model, "module_sha256": sha} if sha else dict(model)


def unkeyed(model: dict[str, Any]) -> dict[str, Any]:
    """A keyed model section without its key-only fields (``ModelConfig``'s fields)."""
    return {k: v for k, v in model.items() if k not in KEY_ONLY}


def check_same_module(model: dict[str, Any], where: str) -> None:
    """A stage keyed with a module's sha256 runs only with that file: an edit between planning and
    running would store one model under another's key."""
    want = model.get("module_sha256")
    if want and module_sha256(model["arch"]) != want:
        raise ArchError(f"{where}: {module_file(model['arch'])} changed since this run was planned; rerun")


def check_runs(arch: str, num_classes: int, size: tuple[int, int] = (32, 32), where: str = "model.arch") -> None:
    """Build ``arch`` and pass a 1x3xHxW zero image through it (eval mode, no gradients): a model
    that cannot run at the data's size (a ViT with a fixed img_size of 224) or whose factory does
    not make a classifier of ``num_classes`` fails here, in one line, before any work."""
    if kind_of(arch) in ("registry", "robustbench"):
        return
    net = build_net(arch, num_classes, where).eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, *size))
    except Exception as e:  # noqa: BLE001 - whatever the model raises, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ArchError(f"{where}={arch!r} cannot run on the data's {size[0]}x{size[1]} images ({type(e).__name__}: "
                        f"{first}); choose a model that accepts {size[0]}x{size[1]} inputs") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchError(f"{where}={arch!r} gives {shape} for one image, not logits of shape (1, {num_classes}) "
                        f"(the data's {num_classes} classes)")


def archs_named(tree: Any, where: str = "") -> dict[str, str]:
    """Every architecture a config names (keys ``arch``, lists ``archs``), first setting naming it."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            at = f"{where}.{k}" if where else str(k)
            if k == "arch" and isinstance(v, str):
                out.setdefault(v, at)
            elif k == "archs" and isinstance(v, (list, tuple)):
                for i, a in enumerate(v):
                    if isinstance(a, str):
                        out.setdefault(a, f"{at}[{i}]")
            else:
                for a, w in archs_named(v, at).items():
                    out.setdefault(a, w)
    return out
