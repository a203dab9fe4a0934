"""docs/settings.md, generated from the config schema so that it cannot drift from the code.

    python -m pipeline.settings_doc            write docs/settings.md
    python -m pipeline.settings_doc --check    exit 1 (and say so) when docs/settings.md is not what the code gives

Every setting is a field of a frozen dataclass: the built-in sections of
``advfeatures.config.ExperimentConfig`` and the sections registered in ``advfeatures.config.SECTIONS``
(the orchestration's ``fanout``, ``dask``, ``report``: ``pipeline.orchestration``; each experiment's
own: ``pipeline.experiments``). For each one the page gives its dotted name, type (from the type
hints), default (the config an empty profile resolves to, so inherited defaults are shown as they
apply), description (the string literal under the field, else its comment; the class docstring for
a section) and the stage kinds whose keys hold it.

The last is measured, not written down: each setting is changed away from a probe config (one
value per type: a bool flipped, a number moved, a string from the values the code accepts, a list
shortened or lengthened) and every experiment is re-planned; a stage kind holds the setting when a
stage of the same name gets another config, and a change that adds or removes stages is reported
as such. The probe config is ``PROBE`` and each experiment's ``probes`` (``Experiment.probes``).
Nothing here runs a stage or reads data: plans are made against a made-up data hash.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import io
import os
import re
import sys
import tempfile
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

import pipeline.orchestration  # registers fanout, dask and report
from advfeatures import config as C
from pipeline.experiments import Experiment, all_experiments, get

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "settings.md"
COMMAND = "python -m pipeline.settings_doc"
SHA = "0" * 64
"""The data hash plans are made against: keys are compared, never looked up."""
ORCHESTRATION = pipeline.orchestration.__name__


@dataclass(frozen=True)
class Setting:
    name: str
    """Dotted, as in ``--set name=value``."""
    section: str
    type: str
    default: Any
    doc: str
    when: str = ""
    """The optional mapping that must be set for this default to apply (e.g. source.train.adversarial)."""


@dataclass(frozen=True)
class Section:
    name: str
    cls: type
    doc: str
    origin: str
    """'core' (ExperimentConfig), 'flows' (``pipeline.orchestration``) or the experiment's name."""
    settings: tuple[Setting, ...]


# ---------------------------------------------------------------------------------------------
# Descriptions: the string under each field (or its comment), read from the class's source


def _clean(text: str) -> str:
    """One line of Markdown: whitespace collapsed, reST ``literals`` as `code`."""
    text = " ".join(inspect.cleandoc(text).split())
    return text.replace("``", "`")


def field_docs(cls: type) -> dict[str, str]:
    """field name -> its description: the string literal right under the field, else the comment on
    its line, in the class or the dataclass it inherits the field from. Fields without either are absent."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            out.update(_own_field_docs(base))
    return {**out, **_own_field_docs(cls)}


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(src).body[0].body
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            out[node.target.id] = _clean(nxt.value.value)
        elif node.lineno in comments and "noqa" not in comments[node.lineno]:
            out[node.target.id] = _clean(comments[node.lineno])
    return out


def class_doc(cls: type) -> str:
    """The class's own docstring (not the signature dataclasses make up when it has none)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return ""
    doc = ast.get_docstring(tree.body[0], clean=True)
    return _clean(doc) if doc else ""


# ---------------------------------------------------------------------------------------------
# The schema


def _optional_dataclass(tp: Any) -> type | None:
    """X for ``X | None`` where X is a dataclass, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]) and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, str(tp))


def _leaves(cls: type, prefix: str, section: str, value: Any, when: str = "") -> Iterator[Setting]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if cls is C.ExperimentConfig and f.name == "sections":
            continue
        tp, name = hints[f.name], f"{prefix}{f.name}"
        current = getattr(value, f.name)
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{name}.", section, current, when)
            continue
        inner = _optional_dataclass(tp)
        yield Setting(name, section, type_name(tp), C.to_plain(current), docs.get(f.name, ""), when)
        if inner is not None:  # e.g. train.adversarial: null by default, its fields once it is set
            yield from _leaves(inner, f"{name}.", section, current if current is not None else inner(),
                               (when or name) if current is None else when)


def resolve(raw: dict) -> C.ExperimentConfig:
    """``raw`` resolved as the code has it, whatever $ADVFEATURES_STORE and $ADVFEATURES_SET say in
    this shell."""
    saved = {name: os.environ.pop(name) for name in (C.STORE_ENV, C.SET_ENV) if name in os.environ}
    try:
        return C.resolve(raw)
    finally:
        os.environ.update(saved)


def default_config() -> C.ExperimentConfig:
    """What an empty profile resolves to (teacher and student inheriting from source)."""
    return resolve({})


def _owners() -> dict[str, Experiment]:
    """section name -> the experiment that reads it."""
    return {e.section[0]: e for e in all_experiments().values() if e.section is not None}


def sections() -> list[Section]:
    """Every section: the built-in ones in ExperimentConfig's order (``name`` first, on its own),
    then the flows' and the experiments' in the order of their source files."""
    owners = _owners()  # imports the experiments: their sections and set kinds are registered
    cfg = default_config()
    core_docs = field_docs(C.ExperimentConfig)
    hints = typing.get_type_hints(C.ExperimentConfig)
    out = []
    top = [f for f in dataclasses.fields(C.ExperimentConfig) if not dataclasses.is_dataclass(hints[f.name])
           and f.name != "sections"]
    out.append(Section("(top level)", C.ExperimentConfig, "Settings outside any section.", "core",
                       tuple(Setting(f.name, "(top level)", type_name(hints[f.name]), C.to_plain(getattr(cfg, f.name)),
                                     core_docs.get(f.name, "")) for f in top)))
    for f in dataclasses.fields(C.ExperimentConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = core_docs.get(f.name) or class_doc(tp)
            out.append(Section(f.name, tp, doc, "core", tuple(_leaves(tp, f"{f.name}.", f.name, getattr(cfg, f.name)))))
    registered = sorted(C.SECTIONS.items(), key=lambda kv: (kv[1].__module__ != ORCHESTRATION, kv[1].__module__,
                                                          inspect.getsourcelines(kv[1])[1]))
    for name, cls in registered:
        origin = "flows" if cls.__module__ == ORCHESTRATION else owners[name].name if name in owners \
            else cls.__module__
        out.append(Section(name, cls, class_doc(cls), origin, tuple(_leaves(cls, f"{name}.", name, getattr(cfg, name)))))
    return out


def settings() -> list[Setting]:
    return [s for sec in sections() for s in sec.settings]


# ---------------------------------------------------------------------------------------------
# Which keys hold a setting: change it, re-plan every experiment, compare


PROBE: dict[str, Any] = {"construct": {"select": 0.5}, "evaluate": {"robust_eps": [0.5]}}
"""The probe config's changes to an empty profile, before the experiments' (``Experiment.probes``):
settings that matter only when another one is on, turned on so that changing them shows."""

EXTRA_STRINGS = ("float16", "float32", "l2", "linf", "step", "onecycle", "constant", "none", "bf16", "cpu", "cuda",
                 "local", "dask", "tcp://127.0.0.1:8786", "distributed.LocalCluster")
"""Strings tried as other values of a string setting after those its error message names."""
EXTRA_MAPPINGS = ({"rand": {"lr": 0.01}}, {"minimum": 1, "maximum": 2}, {"GPU": 1}, {"n_workers": 1})
"""Values tried for a mapping-valued setting, then the experiments' own (``Probes.mappings``)."""


@dataclass(frozen=True)
class Effect:
    keyed: tuple[str, ...] = ()
    """Stage kinds whose config changed for a stage of the same name."""
    stages: tuple[str, ...] = ()
    """Stage kinds of which stages were added or removed."""
    probed: bool = True
    """False: no other value of it could be planned (the column says so)."""


def _set(tree: dict, dotted: str, value: Any) -> dict:
    """A copy of ``tree`` with the setting replaced, as ``--set dotted=value`` would (config._set_path)."""
    out = copy.deepcopy(tree)
    C._set_path(out, dotted.split("."), copy.deepcopy(value), dotted)
    return out


def _get(tree: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        tree = tree[p]
    return tree


def _plans(raw: dict, experiments: tuple[str, ...]) -> dict[str, dict[str, list[tuple[str, Any]]]] | None:
    """experiment -> {stage kind: [(label, own config) of each of its stages, in plan order]}; None
    when the config is invalid. An experiment that cannot plan this config is left out."""
    try:
        cfg = resolve(raw)
    except C.ConfigError:
        return None
    out = {}
    for name in experiments:
        try:
            plan = get(name).plan_of(cfg, SHA)
        except C.ConfigError:
            continue
        labels = plan.labels()
        stages: dict[str, list[tuple[str, Any]]] = {}
        for spec in plan.stages():
            stages.setdefault(spec.stage, []).append((labels[spec.key], spec.config))
        out[name] = stages
    return out


def _compare(base: dict, new: dict) -> tuple[set[str], set[str]]:
    """(kinds with a stage whose own config changed, kinds with stages added or removed). With as
    many stages of a kind as before, they are compared in plan order (a label may name a value:
    'rand top 0.4'); else only the count is."""
    keyed, stages = set(), set()
    for exp, plan in new.items():
        old = base.get(exp)
        if old is None:
            continue
        for kind in set(plan) | set(old):
            a, b = old.get(kind, []), plan.get(kind, [])
            if len(a) == len(b):
                if any(x[1] != y[1] for x, y in zip(a, b)):
                    keyed.add(kind)
                continue
            stages.add(kind)
    return keyed, stages


def _strings() -> list[str]:
    """Every string a setting might take: the bundled profiles' values, the registries' names."""
    from advfeatures.models import MODELS

    found: set[str] = set(EXTRA_STRINGS) | set(MODELS) | set(all_experiments()) | set(C._ALL_SETS)
    found |= set(C.AUGMENTATIONS) | set(C.STUDENT_INITS)

    def walk(x: Any) -> None:
        if isinstance(x, str):
            found.add(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted(C.PROFILE_DIR.glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return sorted(found)


def _named_in_error(raw: dict, s: Setting, current: Any) -> list[str]:
    """The words of the error a nonsense value of ``s`` gets (``choose 'l2' or 'linf'``): the values
    the code accepts, quoted ones first."""
    bad = "??" if not isinstance(current, list) else [*current, "??"]
    try:
        resolve(_set(raw, s.name, bad))
    except C.ConfigError as e:
        msg = str(e)
        quoted = re.findall(r"'([^'\s]+)'", msg)
        return list(dict.fromkeys(quoted + [w.strip(".,;:()[]{}'\"") for w in msg.split()]))
    return []


def _candidates(s: Setting, current: Any, strings: list[str], named: list[str], paths: list[str],
                mappings: list[dict]) -> list[Any]:
    """Other values to try, in order; a list's shortened and lengthened versions are both used.
    For strings: ``paths`` (the probes' files, elsewhere), then ``named`` (the words of the error
    message a nonsense value gets), then ``strings``."""
    t = s.type
    if t.startswith("mapping or null"):
        return [None] if current is not None else [{}]
    if current is None:
        return [0.5, 1, "x", {}]
    if isinstance(current, bool):
        return [not current]
    if isinstance(current, int):
        return [current + 1, current * 2, max(current - 1, 0), 2]
    if isinstance(current, float):
        return [current / 2 if current else 0.5, current * 2, current + 1, 0.1]
    if isinstance(current, str):
        return [*paths, *named, *strings]
    if isinstance(current, list):
        out = [current[:-1]] if len(current) > 1 else []
        if not current and (t.endswith("of float") or t.endswith("of int")):  # an empty list: one value, two
            return [[1], [0, 1]]
        if t.endswith("of str"):
            return out + [current + [v] for v in dict.fromkeys([*named, *strings]) if v not in current]
        if current and (t.endswith("of float") or t.endswith("of int")):  # one more value; another first value
            top, first = max(current), current[0]
            out += [current + [top + 1], current + [top * 2]]
            changed = [first / 2 if first else 0.25, first + 1] if t.endswith("float") else [first + 1, first * 2]
            out += [[v, *current[1:]] for v in changed]
        return out
    if isinstance(current, dict):
        return [m for m in mappings if m != current]
    return []


def probe_config(folder: Path) -> dict[str, Any]:
    """``PROBE`` and every experiment's ``probes.config`` (files they name made in ``folder``)."""
    raw = copy.deepcopy(PROBE)
    for e in all_experiments().values():
        if e.probes is not None:
            config = e.probes.config(folder) if callable(e.probes.config) else e.probes.config
            raw = C._deep_merge(raw, config)
    return raw


def _leaf_strings(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _leaf_strings(v)]
    return [tree] if isinstance(tree, str) else []


def effects(every: list[Setting] | None = None) -> dict[str, Effect]:
    """setting name -> the stage kinds whose keys hold it (see the module's docstring)."""
    every = settings() if every is None else every
    strings, owners = _strings(), _owners()
    probes = [e.probes for e in all_experiments().values() if e.probes is not None]
    mappings = [*EXTRA_MAPPINGS, *(m for p in probes for m in p.mappings)]
    others = tuple(name for name, e in all_experiments().items() if not (e.probes and e.probes.alone))
    out: dict[str, Effect] = {}
    with tempfile.TemporaryDirectory(prefix="settings-doc-") as tmp:
        probe = probe_config(Path(tmp) / "a")
        seen = _leaf_strings(probe)  # the same files elsewhere: their paths are tried as other strings
        paths = [v for v in _leaf_strings(probe_config(Path(tmp) / "b")) if v not in seen]
        bases: dict[tuple[str, str], tuple[Any, dict]] = {}  # probe -> (its plans, its resolved config)
        for s in every:
            raw = _set(probe, s.when, {}) if s.when else probe  # an optional mapping's fields: with it set
            owner = owners.get(s.section)
            alone = owner.name if owner and owner.probes and owner.probes.alone else ""
            experiments = (alone,) if alone else others
            if (s.when, alone) not in bases:
                bases[(s.when, alone)] = (_plans(raw, experiments), resolve(raw).to_dict())
            base, resolved = bases[(s.when, alone)]
            current = C.to_plain(_get(resolved, s.name))
            keyed: set[str] = set()
            stages: set[str] = set()
            done: set[str] = set()  # lists: one shorter or longer, one with another value
            named = _named_in_error(raw, s, current) if "str" in s.type else []
            for value in _candidates(s, current, strings, named, paths, mappings):
                shape = ("longer" if len(value) > len(current) else "shorter" if len(value) < len(current)
                         else "other") if isinstance(current, list) and isinstance(value, list) else "other"
                if value == current or shape in done:
                    continue
                new = _plans(_set(raw, s.name, value), experiments)
                if new is None:
                    continue
                k, st = _compare(base, new)
                keyed |= k
                stages |= st
                done.add(shape)
                if not isinstance(current, list) or len(done) == 3:
                    break
            out[s.name] = Effect(tuple(sorted(keyed)), tuple(sorted(stages)), bool(done))
    return out


# ---------------------------------------------------------------------------------------------
# The page


def fmt(value: Any) -> str:
    """A value as it is written in a profile (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and not re.search(r"[:#,\[\]{}]", value) \
            else '"' + value + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _text(text: str) -> str:
    """Prose from a docstring as Markdown: outside `code`, * < > are literal characters."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """``_text`` inside a table cell (| escaped)."""
    return _text(text).replace("|", "\\|")


def _kinds_order() -> list[str]:
    from pipeline.kinds import all_kinds

    first = ["dataset", "model", "construct", "select", "student", "eval", "transfer", "run"]
    return first + sorted(k for k in all_kinds() if k not in first)


def _key_cell(e: Effect | None, order: list[str]) -> str:
    if e is None or not e.probed:
        return "?"
    rank = {k: i for i, k in enumerate(order)}
    parts = []
    if e.keyed:
        parts.append(", ".join(sorted(e.keyed, key=lambda k: rank.get(k, len(rank)))))
    if e.stages:
        parts.append("stages: " + ", ".join(sorted(e.stages, key=lambda k: rank.get(k, len(rank)))))
    return "; ".join(parts) if parts else "—"


def _flat(tree: dict, whole: set[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every setting a profile gives; those in ``whole`` (mapping-valued
    settings) whole."""
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and name not in whole:
            yield from _flat(v, whole, f"{name}.")
        else:
            yield name, v


def _header(text: str) -> str:
    """The first sentence of a profile's leading comment, without its parentheses (shortened to
    the part before its first colon when long)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    head = re.sub(r"\s*\([^()]*\)", "", " ".join(lines))
    m = re.search(r"(?<!et al)\.(\s|$)", head)
    head = head[: m.start()] if m else head
    return head.split(": ")[0] if len(head) > 120 else head


def _profile_lines(every: list[Setting]) -> list[str]:
    """Each bundled profile: the first sentence of its comment and the settings it changes."""
    defaults = {s.name: s.default for s in every}
    whole = {s.name for s in every if s.type.startswith("mapping") and not s.type.endswith("null")}
    lines = []
    for path in sorted(C.PROFILE_DIR.glob("*.yaml")):
        text = path.read_text()
        given = []
        for name, value in _flat(yaml.safe_load(text) or {}, whole):
            value = C.to_plain(value)
            if name in defaults and C.to_plain(defaults[name]) == value:  # 1 and 1.0, a tuple and a list
                continue
            given.append(f"`{name}={fmt(value)}`")
        lines.append(f"- **{path.stem}**: {_cell(_header(text))}.  \n  " + (", ".join(given) or "(the defaults)"))
    return lines


INTRO = """\
# Settings reference

<!-- Generated by `{command}` from the config schema (advfeatures/config.py,
pipeline/orchestration.py, pipeline/experiments/*.py): edit the descriptions there, then rerun it.
tests/test_docs_reference.py fails when this page and the code disagree. -->

A run's configuration is a profile (`--profile NAME`: a bundled one, `advfeatures/profiles/NAME.yaml`, or
any YAML path), then `--settings FILE` (a YAML file of sections, e.g. `examples/slurm.yaml`), then each
`--set section.key=value` (the value is read as YAML: `--set construct.sets=[rand,det]`), then `--data PATH`
(`data.source`) and `--store PATH` (`runtime.store`; the environment variable `ADVFEATURES_STORE` overrides the
profile's, not `--set` or `--store`). Every setting is checked before anything runs: an unknown name, a wrong type or a
value out of range is refused with the setting's name and the fix (`unknown setting attack.step; did you mean
attack.steps?`). `advfeatures show-config` prints the resolved config and every stage's key without running.

`teacher` starts from `source` with `train.epochs: 2` (Wallace's brief teacher) and `student.model` /
`student.train` start from `source`'s; neither inherits `train.adversarial`. What a profile or `--set` gives
explicitly wins. The defaults below are those of an empty profile, inheritance applied.

**Key**: the stage kinds whose cache key holds the setting, measured by changing it and re-planning every
experiment (a stage of the same name with another config). A key also holds the keys of the stage's inputs,
so a change reaches everything downstream as well (source → sets → students → evaluations → run table).
`stages: ...`: changing it adds or removes stages of those kinds (another set, seed or radius). `—`: in no
key: where and how things run (the runtime settings change at most floating-point rounding; every manifest
records them). The data source enters keys by its content's sha256 (the `dataset` stage), never by its path.
"""


def markdown() -> str:
    secs = sections()
    every = [s for sec in secs for s in sec.settings]
    eff, order, experiments = effects(every), _kinds_order(), all_experiments()
    out = [INTRO.format(command=COMMAND), "## Sections\n"]
    groups = [("core", "The experiment", "The sections every experiment reads."),
              ("flows", "Orchestration", "How a run is carried out (`pipeline.orchestration`): in no key."),
              (None, "Experiments' own sections", "Each read by its experiment (`advfeatures run --experiment "
               "NAME`; `advfeatures experiments` lists them).")]
    grouped = {g: [s for s in secs if (s.origin if s.origin in ("core", "flows") else None) == g] for g, *_ in groups}
    for origin, title, _ in groups:
        out.append(f"- {title}: " + ", ".join(f"[`{s.name}`](#{s.name})" if s.name != "(top level)"
                                              else "[`name`](#top-level)" for s in grouped[origin]))
    out.append("")
    for origin, title, intro in groups:
        out.append(f"## {title}\n\n{intro}\n")
        for sec in grouped[origin]:
            out.append(f"### {'top level' if sec.name == '(top level)' else sec.name}\n")
            doc = sec.doc
            if origin is None:
                summary = experiments[sec.origin].summary if sec.origin in experiments else ""
                doc = f"Read by the experiment `{sec.origin}`" + (f": {summary}." if summary else ".") + \
                    (f" {doc}" if doc else "")
            if doc:
                out.append(f"{_text(doc)}\n")
            out += ["| Setting | Type | Default | Key | Description |", "|---|---|---|---|---|"]
            for s in sec.settings:
                default = f"`{fmt(s.default)}`" + (f" (once `{s.when}` is set)" if s.when else "")
                out.append(f"| `{s.name}` | {s.type} | {_cell(default)} | {_key_cell(eff.get(s.name), order)} | "
                           f"{_cell(s.doc)} |")
            out.append("")
    out.append("## Bundled profiles\n")
    out.append("What each profile in `advfeatures/profiles/` changes from the defaults above (`--profile NAME`).\n")
    out += [*_profile_lines(every), ""]
    for title, intro, header, rows in (
            ("Renamed settings", "A profile or override that names an old setting is refused with the new name.",
             "| Old | New |", [f"| `{old}` | `{new}` |" for old, new in sorted(C.MOVED.items())]),
            ("Removed settings", "A profile or override that names one is refused, saying what to do instead.",
             "| Setting | Instead |", [f"| `{old}` | {_cell(hint)} |" for old, hint in sorted(C.REMOVED.items())])):
        if rows:
            out.extend([f"## {title}\n", f"{intro}\n", header, "|---|---|", *rows, ""])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description="write docs/settings.md from the config schema")
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if they differ")
    p.add_argument("--out", type=Path, default=DOC, help=f"the page (default: {DOC.relative_to(ROOT)})")
    args = p.parse_args(argv)
    text = markdown()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is not what the config schema gives; run {COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
