"""Typed, frozen configuration: data, model, training, attack, dataset construction, experiment.

A profile is a YAML file (``advfeatures/profiles/<name>.yaml`` or any path) that is merged over
the dataclass defaults, then ``--set a.b.c=value`` overrides are applied, then everything is
validated. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming
the setting and the fix.

Inheritance, so profiles stay short: ``teacher`` starts from ``source`` with ``train.epochs: 2``
(Wallace's brief teacher); ``student`` starts from ``source``; neither inherits
``train.adversarial`` (a robust source's students are standard models) nor ``checkpoint``. Anything given
explicitly wins.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"
SET_KINDS = ("rand", "other", "det", "errors")
"""The sets of section 3.2 and Wallace's errors set: ``construct.sets``'s default."""
_KNOWN_SETS: list[str] = []
"""Every set kind a registered builder can plan from ``construct.sets`` (``pipeline.sets``):
``construct.sets`` is checked against it once builders are registered."""
_ALL_SETS: list[str] = []
"""Every registered set kind, planned from ``construct.sets`` or by an experiment:
``student.per_set`` is checked against it."""


def register_set_kind(kind: str, plannable: bool = True) -> None:
    """Called by set builders (``pipeline.sets.register``) so configs can name their kind."""
    for known, add in ((_ALL_SETS, True), (_KNOWN_SETS, plannable)):
        if add and kind not in known:
            known.append(kind)


SECTIONS: dict[str, type] = {}
"""Config sections that experiments bring (``pipeline.experiments``), by name: a profile's
top-level key of that name is built into that dataclass, and ``cfg.<name>`` returns it."""


_DISCOVERY: list = []
"""Callables run before a profile is resolved, so the layer above can register its set kinds and
sections first (``pipeline`` adds its discovery when imported)."""


def add_discovery(hook) -> None:
    if hook not in _DISCOVERY:
        _DISCOVERY.append(hook)


MOVED: dict[str, str] = {}
"""Settings that moved to a registered section: old dotted name -> new one (refused, naming it)."""


REMOVED: dict[str, str] = {}
"""Settings that were removed: dotted name -> what to do instead (refused, saying it)."""


def register_section(name: str, cls: type, moved: dict[str, str] | None = None,
                     removed: dict[str, str] | None = None) -> None:
    if name in {f.name for f in dataclasses.fields(ExperimentConfig)}:
        raise ValueError(f"config section {name!r} is a built-in section")
    if SECTIONS.get(name, cls) is not cls:
        raise ValueError(f"config section {name!r} is registered twice")
    SECTIONS[name] = cls
    MOVED.update(moved or {})
    REMOVED.update(removed or {})


AUGMENTATIONS = ("none", "crop_flip", "robustness")
STUDENT_INITS = ("independent", "shared_with_source")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # the robustness library's values (SCIENCE.md)


class ConfigError(ValueError):
    """A configuration is invalid; the message names the setting and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    source: str = "torchvision"
    """'torchvision' downloads CIFAR-10 into ``download_root``; otherwise a local path: an
    ImageFolder directory (train/<class>/*, test/<class>/*), a zip of one, the official
    cifar-10-python.tar.gz, or its extracted cifar-10-batches-py folder. Keys hold the sha256 of its
    content, not this path."""
    download_root: str = "~/.cache/advfeatures/downloads"
    """Where the torchvision download goes. Not part of any cache key."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "small_cnn"
    """A name in ``advfeatures.models.MODELS`` (e.g. resnet18, robustness_resnet50); ``timm/<name>``, a
    timm model with the data's classes at the data's size (``advfeatures[timm]``);
    ``package.module:factory``, your own model, ``factory(num_classes) -> nn.Module`` (its file's
    sha256 is keyed); ``robustbench/<name>``, a trained RobustBench CIFAR-10 model (source only).
    See docs/your-model.md."""
    mean: tuple[float, ...] = CIFAR_MEAN
    """Per-channel normalisation applied inside the model; inputs stay in [0, 1] pixel space."""
    std: tuple[float, ...] = CIFAR_STD
    """Per-channel standard deviation of that normalisation (the robustness library's CIFAR values)."""

    def __post_init__(self):
        from advfeatures.archs import ArchError, check

        try:
            check(self.arch)
        except ArchError as e:
            raise ConfigError(str(e)) from None
        _check(len(self.mean) == len(self.std) == 3, "model.mean and model.std need 3 values (RGB)")
        _check(all(s > 0 for s in self.std), "model.std values must be > 0")


@dataclass(frozen=True)
class AdversarialTraining:
    """Adversarial training (Madry et al. 2018): every batch, after augmentation, is replaced by
    untargeted PGD examples of it against the model being trained (in eval mode, weights frozen,
    the iterate of largest loss kept, no random start), and the step trains on those. The
    robustness library's CIFAR recipe: L2, eps 0.5, 7 steps of 2.5·eps/7."""
    norm: str = "l2"
    """'l2' or 'linf'."""
    eps: float = 0.5
    """Radius in [0, 1] pixel space."""
    steps: int = 7
    """PGD steps per batch."""
    step_size: float | None = None
    """None: 2.5 · eps / steps."""

    def __post_init__(self):
        _check(self.norm in ("l2", "linf"), f"train.adversarial.norm={self.norm!r}; choose 'l2' or 'linf'")
        _check(self.eps > 0, f"train.adversarial.eps must be > 0, got {self.eps} (for standard training leave "
                             "train.adversarial unset)")
        _check(self.steps >= 1, f"train.adversarial.steps must be >= 1, got {self.steps}")
        _check(self.step_size is None or self.step_size > 0,
               f"train.adversarial.step_size must be > 0, got {self.step_size}")

    @property
    def step(self) -> float:
        return 2.5 * self.eps / self.steps if self.step_size is None else self.step_size


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    """Passes over the training set."""
    batch_size: int = 128
    """Examples per SGD step."""
    lr: float = 0.1
    """Peak learning rate (per batch, not rescaled with batch size)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 5e-4
    """SGD weight decay (on every parameter)."""
    schedule: str = "step"
    """'step' (lr x gamma every step_epochs), 'onecycle' (linear up over warmup, linear down to 0),
    or 'constant'."""
    step_epochs: int = 50
    """step: epochs between two learning-rate drops."""
    gamma: float = 0.1
    """step: the factor each drop multiplies the learning rate by."""
    warmup: float = 0.2
    """onecycle: fraction of all steps spent rising to lr."""
    augment: str | bool = "crop_flip"
    """Augmentation, done on batch tensors on the device: 'none'; 'crop_flip' (random crop with
    4 px zero padding + horizontal flip); 'robustness' (the robustness library's CIFAR recipe:
    crop + flip + ColorJitter(0.25, 0.25, 0.25) + RandomRotation(2)). true/false mean
    'crop_flip'/'none'."""
    seed: int = 0
    """The model's seed. Its initial weights and its data order/augmentation are seeded by
    separate seeds derived from this one and the model's role in the plan (source, teacher,
    student of set K), so no two models of a plan share initial weights or data order."""
    adversarial: AdversarialTraining | None = None
    """Train on untargeted PGD examples of each batch (``AdversarialTraining``); None: standard
    training. Keyed only when set, so the keys of standard models stay as they were."""

    def __post_init__(self):
        if isinstance(self.augment, bool):  # true/false from older profiles
            object.__setattr__(self, "augment", "crop_flip" if self.augment else "none")
        _check(self.augment in AUGMENTATIONS,
               f"train.augment={self.augment!r}; choose one of {list(AUGMENTATIONS)} (or true/false)")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "train.nesterov needs train.momentum > 0")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.schedule in ("step", "onecycle", "constant"),
               f"train.schedule={self.schedule!r}; choose 'step', 'onecycle' or 'constant'")
        _check(self.step_epochs >= 1, "train.step_epochs must be >= 1")
        _check(0 < self.gamma <= 1, "train.gamma must be in (0, 1]")
        _check(0 <= self.warmup < 1, "train.warmup must be in [0, 1)")


@dataclass(frozen=True)
class ModelStageConfig:
    """A model trained on the clean training set (the source, or the teacher of `errors`), or a
    trained one read from ``checkpoint``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = None
    """A trained model to use instead of training one (docs/your-model.md): a state dict of
    ``model.arch``, a TorchScript file, or a robustness-library checkpoint (``model.arch:
    robustness_resnet50``; its normaliser's mean and std are used); with ``model.arch:
    robustbench/<name>``, the folder robustbench loads from. The file's sha256 replaces the training
    recipe in the key; the path itself is not keyed. Not inherited by the teacher."""
    checkpoint_trusted: bool = False
    """Allow a checkpoint that needs full unpickling (``torch.load(weights_only=False)``), which can
    run code from the file: set it only for files you trust. Not keyed."""


@dataclass(frozen=True)
class SourceConfig(ModelStageConfig):
    """The source: a model stage, plus the source seeds a run varies."""
    seeds: tuple[int, ...] = ()
    """Source seeds to vary (replicate and controls): one source per seed, each with every set made
    from it (its own set seed), its teacher and its students, so that a result's spread covers the
    source, the set and the student (tables: the mean over sources, the spread between and within
    sources, the 95% interval over sources). The first seed's stages are those of a run with
    ``train.seed`` set to it; () = the one source of ``train.seed``."""

    def __post_init__(self):
        _check(not (self.checkpoint and len(self.seeds) > 1),
               f"source.seeds={list(self.seeds)} with source.checkpoint: a checkpoint is one source; give one seed "
               "or none")
        _check(len(set(self.seeds)) == len(self.seeds), f"source.seeds has repeats: {list(self.seeds)}")
        _check(all(s >= 0 for s in self.seeds), f"source.seeds must be >= 0, got {list(self.seeds)}")


@dataclass(frozen=True)
class AttackConfig:
    norm: str = "l2"
    """'l2' or 'linf'."""
    eps: float = 0.5
    """Radius of the threat model in [0, 1] pixel space."""
    step_size: float = 0.1
    """Length of each step in [0, 1] pixel space: along the normalised gradient (l2) or its sign (linf)."""
    steps: int = 100
    """PGD iterations per image."""
    random_start: bool = False
    """Start from a random point of the eps-ball around the image (seeded per row) instead of the image."""
    use_best: bool = True
    """Keep each example's lowest-target-loss iterate, the start included."""

    def __post_init__(self):
        _check(self.norm in ("l2", "linf"), f"attack.norm={self.norm!r}; choose 'l2' or 'linf'")
        _check(self.eps >= 0, f"attack.eps must be >= 0, got {self.eps}")
        _check(self.step_size > 0, f"attack.step_size must be > 0, got {self.step_size}")
        _check(self.steps >= 0, f"attack.steps must be >= 0, got {self.steps}")


@dataclass(frozen=True)
class ConstructConfig:
    sets: tuple[str, ...] = SET_KINDS
    """Which constructed sets to build: any of rand, other, det, errors."""
    n_images: int = 0
    """Training images (a seeded random subset) turned into each PGD set; 0 = all."""
    shard_size: int = 1000
    """Rows per shard: the unit of work of one generation worker. Not in the set's key: a set's
    content does not depend on it (a set already begun keeps the layout it was created with)."""
    chunk_size: int = 250
    """Zarr chunk length along N; shard_size must be a multiple, so no two shards share a chunk.
    Not in the key either."""
    dtype: str = "float16"
    """Storage dtype of adversarial images: float16 or float32 (uint8 adds ~0.06 L2 noise)."""
    seed: int = 0
    """Seeds the subset, the targets and each row's random start (from the row's image index)."""
    select: float = 1.0
    """Margin selection: the fraction of each PGD set's rows that students train on, those with
    the largest target margin under the source (logit_t - max_{j != t} logit_j on the stored
    image), taken separately among rows with t = y and t != y so their shares do not change.
    1 = every row (no selection stage). A public replication: the top 40% of D_other gave 78.2%
    against 66.0% for the whole set."""
    augment_copies: int = 0
    """Augmentation-aware PGD: 0 = attack each image as it is (one row per image); k >= 1 = attack
    k fixed random crops (zero padding 4) + horizontal flips of each image, every copy stored as a
    row of its own (an image's copies are consecutive rows, all with its target). The crop and flip
    of copy j of image i come from the set's seed, i and j. A public replication: attacking several
    augmented copies and training students without augmentation gave 74.7% against 67.3% on D_other."""

    def __post_init__(self):
        bad = [s for s in self.sets if _KNOWN_SETS and s not in _KNOWN_SETS]
        _check(not bad, f"construct.sets has unknown {bad}; choose from {_KNOWN_SETS}")
        _check(len(set(self.sets)) == len(self.sets) and self.sets, "construct.sets must be non-empty, without repeats")
        _check(self.n_images >= 0, "construct.n_images must be >= 0 (0 = the whole training set)")
        _check(self.chunk_size >= 1 and self.shard_size >= 1, "construct.shard_size and chunk_size must be >= 1")
        _check(self.shard_size % self.chunk_size == 0,
               f"construct.shard_size={self.shard_size} must be a multiple of construct.chunk_size="
               f"{self.chunk_size} so that no two shards write the same Zarr chunk")
        _check(self.augment_copies >= 0, f"construct.augment_copies={self.augment_copies} must be >= 0 "
               "(0 = no augmentation; k = k augmented copies of each image)")
        _check(0 < self.select <= 1, f"construct.select={self.select} must be in (0, 1]: the fraction of rows kept")
        _check(self.dtype in ("float16", "float32"),
               f"construct.dtype={self.dtype!r}; choose float16 or float32 (uint8 would add ~0.06 L2 noise)")


@dataclass(frozen=True)
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: tuple[int, ...] = (0,)
    """One student per seed and set; the seed replaces train.seed."""
    per_set: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Overrides per set: train settings and ``arch``, e.g. {rand: {lr: 0.01}, det: {augment:
    none}, errors: {arch: resnet18}}."""
    init: str = "independent"
    """'independent': every student starts from its own initial weights, seeded by its set and
    seed. 'shared_with_source': every student starts from the source model's initial weights
    (same architecture needed) -- a control for distillation-like transfer, never a default."""

    def __post_init__(self):
        _check(len(self.seeds) >= 1, "student.seeds needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), f"student.seeds has repeats: {list(self.seeds)}")
        _check(self.init in STUDENT_INITS, f"student.init={self.init!r}; choose one of {list(STUDENT_INITS)}")
        names = {f.name for f in dataclasses.fields(TrainConfig)} | {"arch"}
        for kind, over in self.per_set.items():
            _check(not _ALL_SETS or kind in _ALL_SETS,
                   f"student.per_set.{kind}: unknown set; choose from {_ALL_SETS}")
            _check(isinstance(over, dict), f"student.per_set.{kind} must be a mapping of train settings")
            for k in over:
                _check(k in names, f"student.per_set.{kind}.{k}: not a train setting or arch; known: {sorted(names)}")
            self.train_for(kind, self.seeds[0])  # validates the values
            self.model_for(kind)

    def train_for(self, kind: str, seed: int) -> TrainConfig:
        """The training recipe of the student of ``kind`` with ``seed``."""
        over = {k: v for k, v in self.per_set.get(kind, {}).items() if k != "arch"}
        base = dataclasses.asdict(self.train)
        for k, v in over.items():
            base[k] = v
        base["seed"] = seed
        return build_config(TrainConfig, base, f"student.per_set.{kind}")

    def model_for(self, kind: str) -> ModelConfig:
        """The architecture of the students of ``kind`` (``per_set.<kind>.arch`` or ``model``)."""
        arch = self.per_set.get(kind, {}).get("arch")
        if arch is None:
            return self.model
        _check(isinstance(arch, str), f"student.per_set.{kind}.arch must be a model name")
        return dataclasses.replace(self.model, arch=arch)


@dataclass(frozen=True)
class RuntimeConfig:
    """How and where to run. Only ``amp`` enters cache keys (bf16 changes PGD gradients and
    training); the rest changes at most floating-point rounding (device, threads, batch sizes of
    inference and attack, channels_last, compile): random numbers are drawn on the CPU whatever
    the device. Every manifest and shard marker records the whole runtime."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    threads: int = 0
    """CPU threads for torch; 0 = every CPU this process may use (its affinity mask and cgroup
    quota, so a container limited to 2 CPUs uses 2 threads, not the host's core count)."""
    store: str = ".advstore"
    """Root of the artifact store (Zarr arrays, models, runs)."""
    channels_last: bool = True
    """channels_last memory format for training, PGD and inference (2x faster PGD on 2 CPU cores)."""
    amp: str = "none"
    """'bf16': run the model under bf16 autocast in training and PGD (x and delta stay fp32;
    PGD records are computed in fp32 on the stored images). 'none': fp32 throughout.
    Part of the keys of models, students and PGD sets."""
    compile: bool = False
    """torch.compile the model (not the PGD loop) for training, PGD and inference."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms (CUDA only)."""
    stage_workers: int = 1
    """Independent stages (two students, a student and a set, ...) run at once in this process, up
    to this many (a thread pool; torch's CPU threads are split between them unless runtime.threads
    is set). 1 = one stage after another, in the plan's order."""
    shard_workers: int = 1
    """Shards generated at once in this process (a thread pool bounds it); torch's CPU threads are
    split between them unless runtime.threads is set."""
    attack_batch_size: int = 250
    """Images per batch of the attacks that build sets (PGD, inversion)."""
    eval_batch_size: int = 1000
    """Images per batch of inference (evaluations, teachers' labels) and of robust evaluations' attacks."""

    def __post_init__(self):
        _check(self.threads >= 0, "runtime.threads must be >= 0")
        _check(self.shard_workers >= 1, "runtime.shard_workers must be >= 1")
        _check(self.stage_workers >= 1, "runtime.stage_workers must be >= 1")
        _check(self.amp in ("none", "bf16"), f"runtime.amp={self.amp!r}; choose none or bf16")
        _check(self.attack_batch_size >= 1 and self.eval_batch_size >= 1, "runtime batch sizes must be >= 1")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               f"runtime.device={self.device!r}; use auto, cpu, cuda or cuda:N")


SUBSET = "classes in turn"
"""How a robust evaluation picks its ``n`` test images (``advfeatures.data.classes_in_turn``)."""


@dataclass(frozen=True)
class EvaluateConfig:
    robust_eps: tuple[float, ...] = ()
    """Robust accuracy: every model of the plan is also evaluated on untargeted PGD adversarial
    examples of the clean test set at each of these radii (e.g. [0.25, 0.5]); () = clean only."""
    robust_norm: str = "l2"
    """'l2' or 'linf'."""
    robust_steps: int = 20
    """PGD steps of the robust evaluation's untargeted attack."""
    robust_step_size: float = 0.0
    """0 = 2.5 * eps / steps (Madry et al.)."""
    robust_n: int = 0
    """Robust accuracy on this many images of the clean test set, the classes in turn (the first
    image of each class, then the second...: balanced whatever the split's order); its Wilson
    interval says what that costs in precision; 0 = all of it. Clean accuracy is always on all of it."""
    check_restarts: int = 0
    """The attack's strength check: each robust evaluation is repeated on ``check_n`` test images
    (the classes in turn) with ``check_steps_factor`` times its steps, from the image and from this many
    random starts; a point is robust only if no attack fools the model. Tables show the drop
    from the evaluation's own attack on the same images (it should be <= 1 point). 0: no check."""
    check_steps_factor: int = 2
    """The check's steps: this many times ``robust_steps`` (step 2.5 * eps / steps)."""
    check_n: int = 1000
    """Test images the check attacks (chosen as ``robust_n``'s, the classes in turn)."""

    def __post_init__(self):
        _check(self.check_restarts >= 0, f"evaluate.check_restarts must be >= 0 (0: no check), got "
                                         f"{self.check_restarts}")
        _check(self.check_steps_factor >= 1, f"evaluate.check_steps_factor must be >= 1, got "
                                             f"{self.check_steps_factor}")
        _check(self.check_n >= 1, f"evaluate.check_n must be >= 1, got {self.check_n}")
        _check(all(e > 0 for e in self.robust_eps), f"evaluate.robust_eps={list(self.robust_eps)} must be > 0")
        _check(len(set(self.robust_eps)) == len(self.robust_eps), "evaluate.robust_eps has repeats")
        _check(self.robust_norm in ("l2", "linf"), f"evaluate.robust_norm={self.robust_norm!r}; choose 'l2' or 'linf'")
        _check(self.robust_steps >= 1, "evaluate.robust_steps must be >= 1")
        _check(self.robust_step_size >= 0, "evaluate.robust_step_size must be >= 0 (0 = 2.5 * eps / steps)")
        _check(self.robust_n >= 0, f"evaluate.robust_n must be >= 0 (0 = the whole test set), got {self.robust_n}")

    def attack_for(self, eps: float) -> dict[str, Any]:
        step = self.robust_step_size or 2.5 * eps / self.robust_steps
        a = {"norm": self.robust_norm, "eps": eps, "steps": self.robust_steps, "step_size": step}
        # keyed only when set: older keys stand (a subset's keys changed when it stopped being the head)
        return {**a, "n": self.robust_n, "subset": SUBSET} if self.robust_n else a

    def check_for(self, eps: float) -> dict[str, Any]:
        """The strength check of ``attack_for(eps)`` (``check_restarts`` > 0)."""
        steps = self.check_steps_factor * self.robust_steps
        return {"norm": self.robust_norm, "eps": eps, "steps": steps, "step_size": 2.5 * eps / steps,
                "restarts": self.check_restarts, "n": self.check_n, "subset": SUBSET, "seed": 0,
                "base": self.attack_for(eps)}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "custom"
    """The run's name (a profile's file name unless it sets one): the run stage's key and the report's titles."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the images come from (CIFAR-10 or any ImageFolder-like set of the same shape)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """The source: the classifier trained on the clean training set that the PGD sets attack (a standard
    one unless train.adversarial is set)."""
    teacher: ModelStageConfig = field(default_factory=ModelStageConfig)
    """Wallace's teacher, whose mistakes on the clean training images make the errors set. Starts from
    source's settings with train.epochs 2 (train.adversarial is not inherited)."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """The targeted PGD attack against the source that makes the rand, other and det sets."""
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    """Which training sets are built, from how many images, and how they are stored."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The students trained from scratch on each constructed set and evaluated on the clean test set.
    model and train start from source's (train.adversarial is not inherited)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluations beyond clean test accuracy."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sections: dict[str, Any] = field(default_factory=dict)
    """The experiments' own sections (``SECTIONS``), by name; read them as ``cfg.<name>``."""

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            return SECTIONS[name]()
        raise AttributeError(f"ExperimentConfig has no section {name!r}; sections: {sorted(SECTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# ---------------------------------------------------------------------------------------------
# Building from plain dicts, with strict checking


def to_plain(value: Any) -> Any:
    if isinstance(value, ExperimentConfig):  # the experiments' sections at the top level, as in profiles
        out = {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "sections"}
        return {**out, **{k: to_plain(v) for k, v in value.sections.items()}}
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):  # X | None: null, or X with X's own message
            if value is None:
                return None
            if len(args) == 1:
                return _coerce(args[0], value, where)
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r} has the wrong type; expected {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return build_config(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp)
        return tuple(_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}={value!r} must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a config class, once: it evaluates every annotation string
    again at each call (a quarter of the time of planning every experiment, measured)."""
    return typing.get_type_hints(cls)


def build_config(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = _type_hints(cls)
    sections = dict(SECTIONS) if cls is ExperimentConfig else {}
    names = [f.name for f in dataclasses.fields(cls) if not (sections is not None and cls is ExperimentConfig
                                                             and f.name == "sections")]
    unknown = [k for k in data if k not in names and k not in sections]
    if unknown:
        k = unknown[0]
        known = names + list(sections)
        close = difflib.get_close_matches(k, known, n=1)
        hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else f"; known: {known}"
        raise ConfigError(f"unknown setting {where + '.' if where else ''}{k}{hint}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items() if k in names}
    if cls is ExperimentConfig:
        kwargs["sections"] = {n: _coerce(c, data[n], n) if n in data else c() for n, c in sections.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "per_set":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'attack.steps=50' -> (['attack', 'steps'], 50). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. attack.steps=50")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty name in {path!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def settings_overrides(path: str) -> list[str]:
    """A YAML file of settings (a partial profile: ``fanout: {executor: dask}``, ``dask: {...}``)
    as overrides, one per setting of each section (``dask.cluster_kwargs={...}``): applied after
    the profile and before ``--set``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--settings {path}: no such file (examples/ holds laptop, gpu-box, slurm and kubernetes)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--settings {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--settings {path} must be a YAML mapping of sections, e.g. dask: {{address: ...}}")
    out = []
    for section, body in data.items():
        items = body.items() if isinstance(body, dict) else [(None, body)]
        for key, value in items:
            name = section if key is None else f"{section}.{key}"
            out.append(f"{name}={json.dumps(value)}")  # JSON is YAML: parse_override reads it back as it was
    return out


def _set_path(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {text!r}: {p} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A config recorded by an older version (a run's config.yaml) under today's names: each moved
    setting (``MOVED``) at its new name, each removed one (``REMOVED``) left out."""
    raw = copy.deepcopy(raw)
    for old in [*MOVED, *REMOVED]:
        if _given(raw, old):
            section, _, key = old.partition(".")
            value = raw[section].pop(key)
            if old in MOVED:
                _set_path(raw, MOVED[old].split("."), value, old)
    return raw


def _given(raw: dict[str, Any], name: str) -> bool:
    """Whether the raw config gives the setting ``section.key``."""
    section, _, key = name.partition(".")
    return isinstance(raw.get(section), dict) and key in raw[section]


def profile_summaries() -> dict[str, str]:
    """Every bundled profile (advfeatures/profiles/*.yaml) and the first sentence of its header comment."""
    import re

    out = {}
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# (no header)")
        first = re.sub(r"\s*\((`advfeatures|measured).*$", "", first.lstrip("# ").strip())  # a run line, a pointer
        out[path.stem] = first.rstrip(".:;,")
    return out


def load_profile(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a profile: a bundled name ('demo', 'paper') or a YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        bundled = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"profile {name_or_path!r} not found; use one of {bundled} or a path to a YAML file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping at the top level")
    data.setdefault("name", path.stem)
    return data


STORE_ENV = "ADVFEATURES_STORE"
"""Environment variable naming the store for every run of a process (containers, workers): it
overrides the profile's ``runtime.store`` and is overridden by ``--set runtime.store=`` / ``--store``."""
SET_ENV = "ADVFEATURES_SET"
"""Space-separated ``fanout.*``, ``dask.*`` and ``runtime.threads`` overrides of the machine a run
executes on (a served or deployed flow's shards go to its Dask cluster; a host running several
worker processes gives each its share of the CPUs), applied below the run's own overrides; they are
in no key, so they cannot change a result."""
SET_ENV_SECTIONS = ("fanout", "dask")
SET_ENV_PATHS = (("runtime", "threads"),)


def default_store() -> str:
    """The store a command uses when none is given: $ADVFEATURES_STORE, else runtime.store's default."""
    return os.environ.get(STORE_ENV) or RuntimeConfig().store


def resolve(profile: str | dict[str, Any] = "demo", overrides: list[str] | tuple[str, ...] = (),
            data: str | None = None, store: str | None = None) -> ExperimentConfig:
    """Profile + overrides (+ the --data and --store shortcuts) -> validated ExperimentConfig."""
    for hook in _DISCOVERY:
        hook()
    raw = copy.deepcopy(profile) if isinstance(profile, dict) else load_profile(profile)
    if os.environ.get(STORE_ENV):  # a deployment's shared store, below explicit overrides
        _set_path(raw, ["runtime", "store"], os.environ[STORE_ENV], STORE_ENV)
    for text in os.environ.get(SET_ENV, "").split():
        parts, value = parse_override(text)
        if parts[0] not in SET_ENV_SECTIONS and tuple(parts) not in SET_ENV_PATHS:
            raise ConfigError(f"{SET_ENV}={os.environ[SET_ENV]!r}: {text!r} is not a fanout.*, dask.* or "
                              "runtime.threads setting (only those, which no key holds, may come from the "
                              "environment); pass it as an override")
        _set_path(raw, parts, value, f"{SET_ENV}: {text}")
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(raw, parts, value, text)
    if data is not None:
        _set_path(raw, ["data", "source"], str(data), "--data")
    if store is not None:
        _set_path(raw, ["runtime", "store"], str(store), "--store")
    for old, new in MOVED.items():
        if _given(raw, old):
            raise ConfigError(f"{old} is now {new}; rename it in the profile or override")
    for old, hint in REMOVED.items():
        if _given(raw, old):
            raise ConfigError(f"{old} was removed ({hint}); delete it from the profile or override")
    source = raw.get("source", {})
    if not isinstance(source, dict):
        raise ConfigError("source must be a mapping with model and train sections")
    # train.adversarial is the source's own: a robust source's teacher and students train as
    # standard models unless they ask for it themselves
    # so is its checkpoint: the teacher is trained unless teacher.checkpoint names one
    inherited = {k: ({kk: vv for kk, vv in v.items() if kk != "adversarial"} if k == "train" and isinstance(v, dict)
                     else v) for k, v in source.items() if k not in ("seeds", "checkpoint", "checkpoint_trusted")}
    teacher_base = _deep_merge(inherited, {"train": {"epochs": 2}})
    raw["teacher"] = _deep_merge(teacher_base, raw.get("teacher") or {})
    raw["student"] = _deep_merge({k: v for k, v in inherited.items() if k in ("model", "train")},
                                 raw.get("student") or {})
    return build_config(ExperimentConfig, raw, "")
