"""Plans as data: labelled stage specs whose edges are their input keys, and the specs of the core
stages (dataset, source/teacher, sets, selections, students, evaluations).

    dataset ─► source ─► construct(rand|other|det) ─► student(set, seed) ─► eval ─► table
       │        └─ eval                                                       ▲
       └──────► teacher ─► construct(errors) ─► student(errors, seed) ─► eval ┘

A ``Plan`` is an ordered collection of ``Node`` (spec, label, tags): experiments build plans and
combine them (``a | b``: the union, each stage once), and a run is limited to part of one with
``until``. Tags say what a stage is to the tables (``role``: dataset, source, teacher, set,
selection, student, eval; ``set``, ``seed``, ``of`` for evaluations, ``eps`` for robust ones);
they are not part of any key.

key = stage_key(stage, schema, own config, upstream keys) (``pipeline.kinds``). A key holds every
setting that can change a result and nothing else:

- models and students: their role in the plan, architecture (a user module's: its file's sha256
  too), training recipe, the seeds derived from role and seed (initial weights; data order +
  augmentation), and ``runtime.amp``; a model read from a checkpoint: role, architecture and the
  file's sha256 instead of recipe, seeds and amp (the path is an execution option);
- sets: what their builder keys (``pipeline.sets``): for PGD sets kind, attack, subset size,
  seed, storage dtype, ``runtime.amp`` and, when on, the number of augmented copies per image.
  How a set is cut into shards and chunks is an execution option (``StageSpec.options``).

The device, threads, store, batch sizes, channels_last and compile change at most floating-point
rounding (random numbers are drawn on the CPU), so they are not in keys; every manifest records
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from advfeatures.archs import keyed, kind_of
from advfeatures.config import ConfigError, ExperimentConfig, ModelStageConfig, TrainConfig, to_plain
from advfeatures.seeds import derive_seed, model_seeds
from pipeline.kinds import StageSpec, all_kinds


@dataclass(frozen=True)
class Node:
    spec: StageSpec
    label: str
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.spec.key


def check_until(stage: str) -> None:
    """``--until stage`` names a stage kind, else ConfigError listing them (before any plan is made)."""
    if stage not in all_kinds():
        raise ConfigError(f"--until {stage}: not a stage kind; choose one of {sorted(all_kinds())}")


class Plan:
    """Stage specs in dependency order (every input of a stage is an earlier stage of the plan, or
    outside it), each with a label and tags, and the run stage that tabulates them (if any)."""

    def __init__(self, nodes: Iterable[Node] = (), run: StageSpec | None = None,
                 replicates: dict[int, Plan] | None = None):
        self._nodes: dict[str, Node] = {}
        for n in nodes:
            self._add(n)
        self.run = run
        self.replicates: dict[int, Plan] = dict(replicates or {})
        """source seed -> the plan of that source (``over_sources``); empty: one source."""

    # building -----------------------------------------------------------------------------------
    def _add(self, node: Node) -> StageSpec:
        if node.spec.stage == "run":
            raise ValueError("the run stage is the plan's run, not a node")
        if node.key not in self._nodes:  # the same stage from two plans: once, with its first label
            self._nodes[node.key] = node
        return self._nodes[node.key].spec

    def add(self, spec: StageSpec, label: str, **tags: Any) -> StageSpec:
        return self._add(Node(spec, label, tags))

    def __or__(self, other: Plan) -> Plan:
        """The union of two plans: every stage once, this plan's first; no run stage."""
        return Plan([*self.nodes(), *other.nodes()])

    def with_run(self, name: str) -> Plan:
        """This plan with its run stage: the table of every evaluation, clean ones first, then
        robust ones, each in plan order (the run's key depends on that order)."""
        evals = [n for n in self.nodes() if n.spec.stage == "eval"]
        ordered = [n.key for n in evals if "eps" not in n.tags] + [n.key for n in evals if "eps" in n.tags]
        return Plan(self.nodes(), StageSpec("run", {"name": name}, tuple(ordered)), self.replicates)

    def until(self, stage: str) -> Plan:
        """Only the stages of kind ``stage`` and everything they need (no run stage), e.g.
        ``until("construct")``: the sets, to train students elsewhere later."""
        check_until(stage)
        wanted = {n.key for n in self.nodes() if n.spec.stage == stage}
        if not wanted:
            kinds = sorted({n.spec.stage for n in self.nodes()})
            raise ConfigError(f"--until {stage}: this plan has no {stage} stage; its stages are {kinds}")
        for n in reversed(self.nodes()):
            if n.key in wanted:
                wanted.update(n.spec.inputs)
        return Plan([n for n in self.nodes() if n.key in wanted])

    # reading ------------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def stages(self) -> list[StageSpec]:
        """Every stage once, in an order that respects dependencies, the run stage last."""
        return [n.spec for n in self._nodes.values()] + ([self.run] if self.run is not None else [])

    def labels(self) -> dict[str, str]:
        """A readable name for every stage key."""
        out = {n.key: n.label for n in self._nodes.values()}
        if self.run is not None:
            out[self.run.key] = "table"
        return out

    def find(self, **tags: Any) -> list[Node]:
        """The nodes whose tags have these values (None: the tag is absent), in plan order."""
        return [n for n in self._nodes.values() if all(n.tags.get(k) == v for k, v in tags.items())]

    def one(self, **tags: Any) -> Node:
        found = self.find(**tags)
        if len(found) != 1:
            raise KeyError(f"{len(found)} stages of the plan have tags {tags}, expected one")
        return found[0]

    def get(self, **tags: Any) -> StageSpec | None:
        found = self.find(**tags)
        return found[0].spec if found else None

    def evals_of(self, model_key: str) -> tuple[StageSpec | None, list[StageSpec]]:
        """A model's clean evaluation and its robust ones (by radius, in plan order)."""
        evals = self.find(role="eval", of=model_key)
        clean = [n.spec for n in evals if "eps" not in n.tags]
        return (clean[0] if clean else None), [n.spec for n in evals if "eps" in n.tags]

    def graph(self) -> list[dict[str, Any]]:
        """One row per stage: kind, label, key and the labels of its inputs (``show-config``)."""
        names = self.labels()
        return [{"stage": s.stage, "what": names[s.key], "key": s.key,
                 "inputs": ", ".join(names.get(k, k) for k in s.inputs)} for s in self.stages()]

    # views of the core roles (what replicate's plans hold) ----------------------------------------
    @property
    def dataset(self) -> StageSpec:
        return self.one(role="dataset").spec

    @property
    def source(self) -> StageSpec:
        return self.one(role="source").spec

    @property
    def source_eval(self) -> StageSpec:
        return self.evals_of(self.source.key)[0]

    @property
    def teacher(self) -> StageSpec | None:
        return self.get(role="teacher")

    @property
    def teacher_eval(self) -> StageSpec | None:
        return self.evals_of(self.teacher.key)[0] if self.teacher is not None else None

    @property
    def constructs(self) -> dict[str, StageSpec]:
        return {n.tags["set"]: n.spec for n in self.find(role="set")}

    @property
    def selections(self) -> dict[str, StageSpec]:
        return {n.tags["set"]: n.spec for n in self.find(role="selection")}

    @property
    def students(self) -> list[SimpleNamespace]:
        """kind, seed, construct (the set trained on), student and eval of every student."""
        return [SimpleNamespace(kind=n.tags["set"], seed=n.tags["seed"], student=n.spec,
                                construct=self._nodes[n.spec.inputs[0]].spec if n.spec.inputs[0] in self._nodes
                                else None, eval=self.evals_of(n.key)[0]) for n in self.find(role="student")]

    def checks_of(self, model_key: str) -> list[StageSpec]:
        """A model's attack-strength checks (``evaluate.check_restarts``), by radius."""
        return [n.spec for n in self.find(role="check", of=model_key)]

    @property
    def robust(self) -> dict[str, list[StageSpec]]:
        """model key -> its robust evaluations, for models that have any."""
        out: dict[str, list[StageSpec]] = {}
        for n in self.find(role="eval"):
            if "eps" in n.tags:
                out.setdefault(n.tags["of"], []).append(n.spec)
        return out


# ---------------------------------------------------------------------------------------------
# The specs of the core stages


def dataset_spec(source_sha256: str) -> StageSpec:
    return StageSpec("dataset", {"source_sha256": source_sha256})


def train_config(train: TrainConfig) -> dict[str, Any]:
    """A train section as keyed: ``adversarial``, added later, only when set (standard models'
    keys stay as they were)."""
    out = to_plain(train)
    if out.get("adversarial") is None:
        out.pop("adversarial", None)
    return out


SETTING = {"robust-source": "robust_datasets"}
"""The config section a role's checkpoint is set in, where it is not the role's name."""


def model_spec(cfg: ModelStageConfig, dataset_key: str, role: str, amp: str) -> StageSpec:
    """The source or the teacher: trained on the clean training set, or read from
    ``cfg.checkpoint`` (``checkpoint_spec``). A user module's file sha256 is keyed
    (``advfeatures.archs.keyed``)."""
    if cfg.checkpoint is not None or kind_of(cfg.model.arch) == "robustbench":
        return checkpoint_spec(cfg, dataset_key, role)
    return StageSpec("model", {"role": role, "model": keyed(to_plain(cfg.model)), "train": train_config(cfg.train),
                               "seeds": model_seeds(role, (), cfg.train.seed), "amp": amp}, (dataset_key,))


def checkpoint_spec(cfg: ModelStageConfig, dataset_key: str, role: str) -> StageSpec:
    """A trained model read from a file: keyed by the file's sha256 in place of the training recipe
    (no train, seeds or amp); the path and the trusted flag are execution options, not keyed."""
    from advfeatures.checkpoints import file_sha256, weights_file

    setting = SETTING.get(role, role)
    f = weights_file(cfg.checkpoint or "", cfg.model.arch, setting)
    return StageSpec("model", {"role": role, "model": keyed(to_plain(cfg.model)),
                               "checkpoint": {"sha256": file_sha256(f)}}, (dataset_key,),
                     options={"checkpoint": cfg.checkpoint or "", "trusted": cfg.checkpoint_trusted,
                              "setting": setting})


def trained(cfg: ModelStageConfig) -> ModelStageConfig:
    """``cfg``'s recipe without its checkpoint: a model of the source's recipe that is trained
    (independent models, ensembles, spectrum's robust sources)."""
    return dataclasses.replace(cfg, checkpoint=None, checkpoint_trusted=False)


def construct_spec(cfg: ExperimentConfig, kind: str, inputs: tuple[str, ...]) -> StageSpec:
    """Set ``kind`` as its builder specifies it from ``cfg`` (``pipeline.sets``)."""
    from pipeline.sets import builder

    b = builder(kind)
    if b.spec is None:
        raise ConfigError(f"set kind {kind!r} cannot be planned from construct.sets ({b.doc})")
    return b.spec(cfg, kind, inputs)


def select_spec(cfg: ExperimentConfig, construct: StageSpec, source: StageSpec) -> StageSpec:
    """The rows of a PGD set with the largest target margin under the source (construct.select)."""
    return StageSpec("select", {"fraction": cfg.construct.select, "by": "target_margin", "strata": "t==y"},
                     (construct.key, source.key))


def student_spec(cfg: ExperimentConfig, kind: str, seed: int, construct: StageSpec,
                 source: StageSpec | None, recipe: str | None = None) -> StageSpec:
    """A student of set ``kind`` with ``seed``: its own initial weights and data order, unless
    ``student.init`` is shared_with_source (then the source's initial weights). ``recipe``: the set
    whose ``student.per_set`` entry it trains with (a control trains as its set does), unless
    ``student.per_set`` names ``kind`` itself."""
    rk = kind if recipe is None or kind in cfg.student.per_set else recipe
    model = keyed(to_plain(cfg.student.model_for(rk)))
    src = cfg.source.train.seed  # a varied source's students (``for_source``) get seeds of their own
    seeds = model_seeds("student", (kind,) if src == source_seeds(cfg)[0] else (kind, "source", src), seed)
    if cfg.student.init == "shared_with_source":
        if source is not None and "seeds" not in source.config:
            raise ConfigError("student.init=shared_with_source: the source is read from source.checkpoint, it has no "
                              "initial weights to share; set student.init=independent")
        if source is None:
            raise ConfigError(f"student.init=shared_with_source: the {kind} students have no source model in this "
                              "experiment; set student.init=independent")
        if model["arch"] != source.config["model"]["arch"]:
            raise ConfigError(f"student.init=shared_with_source needs the {kind} students to have the source's "
                              f"architecture ({source.config['model']['arch']}), not {model['arch']}; "
                              "set student.init=independent or the same arch")
        seeds["init"] = source.config["seeds"]["init"]
    return StageSpec("student", {"role": "student", "set": kind, "init": cfg.student.init, "model": model,
                                 "train": train_config(cfg.student.train_for(rk, seed)), "seeds": seeds,
                                 "amp": cfg.runtime.amp}, (construct.key,))


def eval_spec(model: StageSpec, dataset: StageSpec) -> StageSpec:
    return StageSpec("eval", {"labels": "clean"}, (model.key, dataset.key))


def robust_eval_spec(cfg: ExperimentConfig, model: StageSpec, ds: StageSpec, eps: float) -> StageSpec:
    """Accuracy of ``model`` on untargeted PGD adversarial examples of the clean test set at ``eps``."""
    return StageSpec("eval", {"labels": "clean", "robust": cfg.evaluate.attack_for(eps), "amp": cfg.runtime.amp},
                     (model.key, ds.key))


def check_eval_spec(cfg: ExperimentConfig, model: StageSpec, ds: StageSpec, eps: float) -> StageSpec:
    """The strength check of ``robust_eval_spec`` at ``eps``: more steps and random restarts on the
    ``evaluate.check_n`` test images, the classes in turn (``evaluate.check_restarts``)."""
    return StageSpec("eval", {"labels": "clean", "robust": cfg.evaluate.check_for(eps), "amp": cfg.runtime.amp},
                     (model.key, ds.key))


def add_robust_evals(plan: Plan, cfg: ExperimentConfig, spec: StageSpec, ds: StageSpec, label: str,
                     radii: Any) -> None:
    """``spec``'s robust evaluations at ``radii`` and, with ``evaluate.check_restarts``, their
    strength checks (role check)."""
    for eps in radii:
        plan.add(robust_eval_spec(cfg, spec, ds, eps), f"{label} eps={eps:g}", role="eval", of=spec.key, eps=eps)
    if cfg.evaluate.check_restarts:
        for eps in radii:
            plan.add(check_eval_spec(cfg, spec, ds, eps), f"{label} eps={eps:g} check", role="check", of=spec.key,
                     eps=eps)


# ---------------------------------------------------------------------------------------------
# Building plans


def add_model(plan: Plan, cfg: ExperimentConfig, spec: StageSpec, label: str, ds: StageSpec, robust: bool = True,
              **tags: Any) -> StageSpec:
    """A model, its clean evaluation and (``evaluate.robust_eps``) its robust ones."""
    plan.add(spec, label, **tags)
    plan.add(eval_spec(spec, ds), label, role="eval", of=spec.key)
    add_robust_evals(plan, cfg, spec, ds, label, cfg.evaluate.robust_eps if robust else ())
    return spec


def add_students(plan: Plan, cfg: ExperimentConfig, kind: str, trained_on: StageSpec, ds: StageSpec,
                 source: StageSpec | None, robust: bool = True, recipe: str | None = None) -> list[StageSpec]:
    """One student per seed of ``student.seeds`` on ``trained_on``, each evaluated (``recipe``: as
    ``student_spec``)."""
    return [add_model(plan, cfg, student_spec(cfg, kind, seed, trained_on, source, recipe), f"{kind} seed={seed}", ds,
                      robust, role="student", set=kind, seed=seed) for seed in cfg.student.seeds]


def add_set(plan: Plan, cfg: ExperimentConfig, kind: str) -> StageSpec:
    """Set ``kind`` from the plan's source (or teacher, made on first need), its margin selection
    (construct.select < 1, for perturbed sets) and its students."""
    from pipeline.sets import builder

    ds, source = plan.dataset, plan.source
    b = builder(kind)
    if b.upstream == "teacher":
        upstream = plan.teacher or add_model(plan, cfg, model_spec(cfg.teacher, ds.key, "teacher", cfg.runtime.amp),
                                             "teacher", ds, role="teacher")
    else:
        upstream = source
    spec = plan.add(construct_spec(cfg, kind, (ds.key, upstream.key)), kind, role="set", set=kind)
    trained_on = spec
    if b.upstream == "source" and b.selectable and cfg.construct.select < 1:
        sel = select_spec(cfg, spec, source)
        trained_on = plan.add(sel, f"{kind} top {sel.config['fraction']:g}", role="selection", set=kind)
    add_students(plan, cfg, kind, trained_on, ds, source)
    return spec


def base_plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    """The dataset and the source with its evaluations."""
    plan = Plan()
    ds = plan.add(dataset_spec(source_sha256), "data", role="dataset")
    add_model(plan, cfg, model_spec(cfg.source, ds.key, "source", cfg.runtime.amp), "source", ds, role="source")
    return plan


def make_plan(cfg: ExperimentConfig, source_sha256: str) -> Plan:
    """Section 3.2 and Wallace's errors set: the source, every set of ``construct.sets`` (the
    teacher when a set needs it), students of each, and the run stage."""
    plan = base_plan(cfg, source_sha256)
    if any(_upstream(k) == "teacher" for k in cfg.construct.sets):  # the teacher before the sets, as always
        ds = plan.dataset
        add_model(plan, cfg, model_spec(cfg.teacher, ds.key, "teacher", cfg.runtime.amp), "teacher", ds,
                  role="teacher")
    for kind in cfg.construct.sets:
        add_set(plan, cfg, kind)
    return order_core(plan).with_run(cfg.name)


def source_seeds(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The source seeds of a run: ``source.seeds``, else the one of ``source.train.seed``."""
    return tuple(cfg.source.seeds) or (cfg.source.train.seed,)


def replicate_seed(cfg: ExperimentConfig, s: int, base: int) -> int:
    """A seed of the replicate of source seed ``s``: ``base`` (the config's own) for the first source
    seed, so its stages are those of a one-source run; derived from (base, s) for the others."""
    if s == source_seeds(cfg)[0]:
        return base
    return derive_seed("replicate", base, s) & 0x7FFFFFFF


def for_source(cfg: ExperimentConfig, s: int) -> ExperimentConfig:
    """``cfg`` for the replicate of source seed ``s``: the source trained with seed s, and the sets
    and teacher made from it with their own seeds (``replicate_seed``); students get theirs from
    the source seed too (``student_spec``), so no two models of a run share initial weights."""
    teacher = dataclasses.replace(cfg.teacher, train=dataclasses.replace(
        cfg.teacher.train, seed=replicate_seed(cfg, s, cfg.teacher.train.seed)))
    return dataclasses.replace(
        cfg, source=dataclasses.replace(cfg.source, train=dataclasses.replace(cfg.source.train, seed=s)),
        teacher=teacher, construct=dataclasses.replace(cfg.construct, seed=replicate_seed(cfg, s, cfg.construct.seed)))


def over_sources(build: Any, cfg: ExperimentConfig, source_sha256: str, experiment: str = "",
                 varies_sources: bool = True) -> Plan:
    """An experiment's plan (``build(cfg, sha)``) once per source seed (``source.seeds``), as one
    plan: every node tagged with its ``source_seed`` (shared stages, the dataset, once), the run
    stage over every evaluation, ``replicates`` holding each source's own plan for its table."""
    seeds = source_seeds(cfg)
    if not cfg.source.seeds:
        return build(cfg, source_sha256)
    if not varies_sources and len(seeds) > 1:
        raise ConfigError(f"source.seeds={list(seeds)}: the {experiment or 'this'} experiment has one source; vary "
                          "source seeds with replicate or controls, or give one seed")
    if len(seeds) == 1:
        return build(for_source(cfg, seeds[0]), source_sha256)
    subs = {s: build(for_source(cfg, s), source_sha256) for s in seeds}
    nodes = [Node(n.spec, f"{n.label} [source {s}]" if n.tags.get("role") != "dataset" else n.label,
                  {**n.tags, "source_seed": s}) for s, sub in subs.items() for n in sub.nodes()]
    return Plan(nodes, replicates=subs).with_run(cfg.name)


def _upstream(kind: str) -> str:
    from pipeline.sets import builder

    return builder(kind).upstream


def order_core(plan: Plan) -> Plan:
    """The stages in the order plans always had (the run key does not depend on it, the order
    stages run in does): dataset, models with their evaluations, sets, selections, the sets made
    from a selection (the row-matched controls), then each student with its evaluations."""
    nodes = plan.nodes()
    first = [n for n in nodes if n.tags.get("role") in ("dataset", "source", "teacher")
             or (n.tags.get("role") == "eval" and _is_model(plan, n.tags.get("of")))]
    sels = [n for n in nodes if n.tags.get("role") == "selection"]
    sel_keys = {n.key for n in sels}
    sets = [n for n in nodes if n.tags.get("role") == "set" and not sel_keys & set(n.spec.inputs)]
    after = [n for n in nodes if n.tags.get("role") == "set" and sel_keys & set(n.spec.inputs)]  # clean-K
    placed = {n.key for n in first + sets + sels + after}
    rest = [n for n in nodes if n.key not in placed]
    return Plan(first + sets + sels + after + rest, plan.run, plan.replicates)


def _is_model(plan: Plan, key: str | None) -> bool:
    return key is not None and any(n.key == key and n.tags.get("role") in ("source", "teacher") for n in plan.nodes())


def labels(plan: Plan) -> dict[str, str]:
    """A readable name for every stage key."""
    return plan.labels()


def plan_summary(plan: Any) -> list[dict[str, Any]]:
    """One line per stage of any experiment's plan: its kind, what it is, its key and its inputs
    (for `advfeatures show-config`)."""
    return plan.graph()
