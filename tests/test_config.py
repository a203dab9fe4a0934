import pytest

from advfeatures.config import (
    PROFILE_DIR, SET_ENV, STORE_ENV, ConfigError, ExperimentConfig, load_profile, parse_override, resolve,
)
from pipeline.plan import make_plan
from pipeline.sets import builder


BUNDLED = ["bugs-only", "cpu", "debate", "demo", "fast", "paper", "robust-datasets", "spectrum", "tiny", "transfer"]


def test_every_bundled_profile_is_tested():
    assert sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) == BUNDLED


def _leaves(tree, path=()):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, (*path, k))
        else:
            yield (*path, k), v


def _as_resolved(key, value):
    """A profile's value as the resolved config holds it (augment: true/false of older profiles)."""
    if key == "augment" and isinstance(value, bool):
        return "crop_flip" if value else "none"
    return value


@pytest.mark.parametrize("profile", BUNDLED)
def test_bundled_profiles_resolve_to_what_they_say(profile, monkeypatch):
    """Every setting written in the profile's YAML is the resolved config's (none dropped or
    renamed on the way), the teacher and the students inherit the source's recipe where the
    profile does not say otherwise, and the profile plans: every set of construct.sets with one
    student per seed, the teacher exactly when a set needs it."""
    monkeypatch.delenv(STORE_ENV, raising=False)
    monkeypatch.delenv(SET_ENV, raising=False)  # conftest's runtime.threads=1 under pytest-xdist
    cfg = resolve(profile)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == profile
    raw, resolved = load_profile(profile), cfg.to_dict()
    for path, value in _leaves(raw):
        if path[:2] == ("student", "per_set"):  # applied per set, not stored as a section
            kind, key = path[2], path[3]
            got = cfg.student.model_for(kind).arch if key == "arch" else getattr(cfg.student.train_for(kind, 0), key)
        else:
            got = resolved
            for k in path:
                got = got[k]
        assert got == _as_resolved(path[-1], value), (path, got, value)
    source_train = resolved["source"]["train"]
    for role in ("teacher", "student"):
        own = raw.get(role, {}).get("train", {})
        inherited = {k: v for k, v in resolved[role]["train"].items() if k not in own and k != "epochs"}
        assert inherited == {k: source_train[k] for k in inherited}, role
        assert resolved[role]["model"] == {**resolved["source"]["model"], **raw.get(role, {}).get("model", {})}
    if "epochs" not in raw.get("teacher", {}).get("train", {}):
        assert cfg.teacher.train.epochs == 2
    plan = make_plan(cfg, "0" * 64)
    assert list(plan.constructs) == list(cfg.construct.sets)
    assert sorted((s.kind, s.seed) for s in plan.students) == \
        sorted((k, seed) for k in cfg.construct.sets for seed in cfg.student.seeds)
    assert (plan.teacher is not None) == ("errors" in cfg.construct.sets)
    selectable = {k for k in cfg.construct.sets if builder(k).selectable and builder(k).upstream == "source"}
    assert set(plan.selections) == (selectable if cfg.construct.select < 1 else set())
    assert cfg.construct.select == 1 or selectable == {"rand", "other", "det"} & set(cfg.construct.sets)


def test_paper_profile_has_the_papers_settings():
    cfg = resolve("paper")
    s = cfg.source.train
    assert (cfg.source.model.arch, s.lr, s.momentum, s.weight_decay, s.batch_size, s.epochs) == \
        ("resnet50", 0.1, 0.9, 5e-4, 128, 150)
    assert (s.schedule, s.step_epochs, s.gamma, s.augment) == ("step", 50, 0.1, "robustness")
    a = cfg.attack
    assert (a.norm, a.eps, a.step_size, a.steps, a.random_start, a.use_best) == ("l2", 0.5, 0.1, 100, False, True)
    assert cfg.student.model.arch == "resnet50"
    assert cfg.student.train_for("rand", 0).lr == 0.01
    assert cfg.student.train_for("det", 0).augment == "none"
    assert cfg.student.train_for("other", 0).augment == "robustness"
    assert cfg.student.train_for("other", 0).lr == 0.1 and cfg.student.train_for("other", 0).epochs == 150
    assert cfg.student.model_for("errors").arch == "resnet18" and cfg.student.model_for("rand").arch == "resnet50"
    assert cfg.teacher.train.epochs == 2 and cfg.teacher.model.arch == "resnet18"
    assert cfg.student.init == "independent"


def test_augment_accepts_booleans_of_older_profiles():
    cfg = resolve("tiny", ["source.train.augment=true", "student.train.augment=false"])
    assert cfg.source.train.augment == "crop_flip" and cfg.student.train.augment == "none"


def test_overrides_are_parsed_as_yaml_and_applied():
    assert parse_override("attack.steps=50") == (["attack", "steps"], 50)
    assert parse_override("construct.sets=[det]") == (["construct", "sets"], ["det"])
    cfg = resolve("tiny", ["attack.steps=50", "attack.eps=0.25", "construct.sets=[det, errors]"])
    assert (cfg.attack.steps, cfg.attack.eps, cfg.construct.sets) == (50, 0.25, ("det", "errors"))


def test_teacher_inherits_source_with_two_epochs():
    cfg = resolve("demo")
    assert cfg.teacher.model == cfg.source.model
    assert cfg.teacher.train.epochs == 2 and cfg.teacher.train.lr == cfg.source.train.lr


def test_adversarial_training_is_the_sources_own():
    """A robust source's teacher and students train as standard models unless they ask."""
    cfg = resolve("tiny", ["source.train.adversarial={eps: 0.5}"])
    adv = cfg.source.train.adversarial
    assert (adv.norm, adv.eps, adv.steps) == ("l2", 0.5, 7) and adv.step == pytest.approx(2.5 * 0.5 / 7)
    assert cfg.teacher.train.adversarial is None and cfg.student.train.adversarial is None
    cfg = resolve("tiny", ["student.train.adversarial={eps: 0.25, steps: 3, step_size: 0.1}"])
    assert cfg.student.train.adversarial.step == 0.1 and cfg.source.train.adversarial is None


@pytest.mark.parametrize("override,match", [
    ("attack.stepz=3", "did you mean attack.steps"),
    ("attack.steps=-1", "attack.steps must be >= 0"),
    ("attack.steps=ten", "must be an integer"),
    ("attack.norm=l1", "choose 'l2' or 'linf'"),
    ("source.model.arch=vgg", "unknown; choose one of"),
    ("construct.shard_size=130", "multiple of construct.chunk_size"),
    ("construct.dtype=uint8", "float16 or float32"),
    ("construct.sets=[rand, bogus]", "unknown"),
    ("student.per_set.rand={lrr: 0.1}", "not a train setting"),
    ("student.per_set.errors={arch: vgg}", "unknown; choose one of"),
    ("student.init=shared", "student.init='shared'; choose one of"),
    ("student.seeds=[0, 0]", "repeats"),
    ("source.train.augment=jitter", "train.augment='jitter'; choose one of"),
    ("student.train.lr=0", "train.lr must be > 0"),
    ("runtime.device=tpu", "runtime.device"),
    ("attack", "section.key=value"),
    ("source.train.adversarial={eps: 0}", "leave train.adversarial unset"),
    ("source.train.adversarial={norm: l1}", "train.adversarial.norm='l1'; choose"),
    ("source.train.adversarial={epss: 0.5}", "did you mean source.train.adversarial.eps"),
    ("source.train.adversarial=0.5", "source.train.adversarial must be a mapping"),
])
def test_bad_settings_raise_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve("tiny", [override])


def test_unknown_profile_names_the_choices():
    with pytest.raises(ConfigError, match="demo"):
        resolve("nope")


def test_configs_are_frozen():
    cfg = resolve("tiny")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.attack.steps = 3  # type: ignore[misc]


def test_a_moved_setting_is_refused_with_its_new_name_and_upgraded_in_recorded_configs():
    """construct.leak_keep_t_eq_y moved to the controls' section: a profile or override naming the
    old name fails, naming the new one; a run's recorded config.yaml is read under the new name."""
    from advfeatures.config import upgrade

    with pytest.raises(ConfigError, match=r"construct.leak_keep_t_eq_y is now controls.leak_keep_t_eq_y"):
        resolve("tiny", ["construct.leak_keep_t_eq_y=true"])
    assert resolve("tiny", ["controls.leak_keep_t_eq_y=true"]).controls.leak_keep_t_eq_y
    recorded = {**resolve("tiny").to_dict(), "construct": {"n_images": 64, "leak_keep_t_eq_y": True}}
    cfg = resolve(upgrade(recorded))
    assert cfg.controls.leak_keep_t_eq_y and cfg.construct.n_images == 64
    assert recorded["construct"]["leak_keep_t_eq_y"]  # upgrade copies
