import pytest

from advfeatures.config import ConfigError, ExperimentConfig, parse_override, resolve


@pytest.mark.parametrize("profile", ["demo", "cpu", "paper", "tiny", "fast"])
def test_bundled_profiles_validate(profile):
    cfg = resolve(profile)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == profile


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
