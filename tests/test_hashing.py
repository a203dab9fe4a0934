import subprocess
import sys

import pytest

from advfeatures.config import AttackConfig, resolve
from advfeatures.plan import make_plan
from storage.hashing import HashingError, canonical_json, stage_key


def test_key_ignores_mapping_order():
    a = stage_key("s", 1, {"a": 1, "b": {"x": 0.5, "y": [1, 2]}}, ["k1"])
    b = stage_key("s", 1, {"b": {"y": [1, 2], "x": 0.5}, "a": 1}, ["k1"])
    assert a == b and len(a) == 16


def test_key_stable_across_processes():
    code = ("from storage.hashing import stage_key;"
            "print(stage_key('attack', 3, {'eps': 0.5, 'steps': 100, 'norm': 'l2'}, ['abc']))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout.strip() for seed in (1, 2)}
    assert keys == {stage_key("attack", 3, {"norm": "l2", "steps": 100, "eps": 0.5}, ["abc"])}


@pytest.mark.parametrize("field,value", [("norm", "linf"), ("eps", 0.25), ("step_size", 0.05), ("steps", 99),
                                         ("random_start", True), ("use_best", False)])
def test_key_changes_with_every_attack_field(field, value):
    base = AttackConfig()
    changed = AttackConfig(**{**base.__dict__, field: value})
    assert stage_key("c", 1, base) != stage_key("c", 1, changed)


def test_key_changes_with_schema_stage_and_inputs():
    k = stage_key("s", 1, {"a": 1}, ["x"])
    assert k != stage_key("s", 2, {"a": 1}, ["x"])
    assert k != stage_key("t", 1, {"a": 1}, ["x"])
    assert k != stage_key("s", 1, {"a": 1}, ["y"])
    assert k != stage_key("s", 1, {"a": 1.0000001}, ["x"])


def test_non_finite_and_non_json_values_are_refused():
    with pytest.raises(HashingError, match="finite"):
        canonical_json({"lr": float("nan")})
    with pytest.raises(HashingError, match="cannot hash"):
        canonical_json({"x": object()})


def _keys(*overrides):
    plan = make_plan(resolve("tiny", list(overrides)), "0" * 64)
    return {"source": plan.source.key, "teacher": plan.teacher.key,
            **{f"c_{k}": v.key for k, v in plan.constructs.items()},
            **{f"s_{s.kind}": s.student.key for s in plan.students}}


def test_student_setting_changes_only_students():
    a, b = _keys(), _keys("student.train.epochs=3")
    same = {k for k in a if a[k] == b[k]}
    assert same == {"source", "teacher", "c_rand", "c_other", "c_det", "c_errors"}


def test_per_set_student_override_changes_only_that_student():
    a, b = _keys(), _keys("student.per_set.det={lr: 0.02}")
    assert {k for k in a if a[k] != b[k]} == {"s_det"}


def test_attack_change_keeps_source_and_errors_chain():
    a, b = _keys(), _keys("attack.steps=7")
    assert {k for k in a if a[k] != b[k]} == {"c_rand", "c_other", "c_det", "s_rand", "s_other", "s_det"}


def test_runtime_settings_change_no_key():
    assert _keys() == _keys("runtime.threads=1", "runtime.store=/elsewhere", "runtime.attack_batch_size=7")
