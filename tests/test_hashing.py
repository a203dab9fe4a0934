import subprocess
import sys

import pytest

from advfeatures.config import AttackConfig, resolve
from pipeline.plan import make_plan
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


def test_adversarial_training_is_keyed_only_when_set():
    """train.adversarial (added later) is in a model's key only when set: standard models keep
    their keys (the pinned ones below), an adversarially trained source changes its own key and
    everything made from it, not the teacher's chain."""
    a, b = _keys(), _keys("source.train.adversarial=null")
    assert a == b
    c = _keys("source.train.adversarial={eps: 0.5}")
    assert {k for k in a if a[k] != c[k]} == {"source", "c_rand", "c_other", "c_det", "s_rand", "s_other", "s_det"}
    d = _keys("source.train.adversarial={eps: 0.5, step_size: 0.17857142857142858}")  # the default, written out
    assert d["source"] != c["source"]  # keyed as written: None and its value are two configs
    e = _keys("student.per_set.det={adversarial: {eps: 0.25}}")
    assert {k for k in a if a[k] != e[k]} == {"s_det"}


def test_attack_change_keeps_source_and_errors_chain():
    a, b = _keys(), _keys("attack.steps=7")
    assert {k for k in a if a[k] != b[k]} == {"c_rand", "c_other", "c_det", "s_rand", "s_other", "s_det"}


def test_runtime_settings_that_only_round_change_no_key():
    """Device, threads, store, batch sizes, memory format, compile and the shard layout change at
    most floating-point rounding (random numbers are drawn on the CPU): no key changes."""
    assert _keys() == _keys("runtime.threads=1", "runtime.store=/elsewhere", "runtime.attack_batch_size=7",
                            "runtime.eval_batch_size=3", "runtime.device=cuda", "runtime.channels_last=false",
                            "runtime.compile=true", "runtime.shard_workers=3",
                            "construct.shard_size=100", "construct.chunk_size=20")


def test_the_flows_settings_change_no_key():
    """How shards are fanned out and whether a report is written change no result."""
    import pipeline.orchestration  # noqa: F401 - registers fanout.*, dask.* and report.*

    def every_key(*overrides):
        return [s.key for s in make_plan(resolve("tiny", list(overrides)), "0" * 64).stages()]

    assert every_key() == every_key("fanout.executor=dask", "dask.address=tcp://h:8786", "fanout.retries=0",
                                    "report.write=false")


def test_amp_changes_every_trained_or_attacked_key():
    """bf16 autocast changes PGD gradients and training: every model, student and PGD set; the
    errors set and its teacher's evaluation-only steps are fp32 but sit downstream of the teacher."""
    a, b = _keys(), _keys("runtime.amp=bf16")
    assert {k for k in a if a[k] == b[k]} == set()


def test_source_and_teacher_with_equal_settings_are_different_models():
    a = _keys("teacher.train.epochs=2")  # the tiny source trains 2 epochs too: same settings
    assert a["source"] != a["teacher"]


# The keys of the `tiny` profile on a fixed data fingerprint. A change here invalidates every
# user's store: it must come with a schema bump in pipeline/kinds.py (the kind's schema number, and its history)
# and a line in CHANGELOG.md (schema bumps and what they invalidate). Update these values only then.
TINY_KEYS = {
    ("dataset", "data"): "dcf5356f11c32aff",
    ("model", "source"): "4ec9532f14e822f1",
    ("eval", "source"): "833738ed96339ed7",
    ("model", "teacher"): "4a342d5d415f3c6e",
    ("eval", "teacher"): "32088e15063fd235",
    ("construct", "rand"): "ac68cbd342ddafc9",
    ("construct", "other"): "cdaf0c245cbd65e4",
    ("construct", "det"): "4f0234b47ffa3cab",
    ("construct", "errors"): "30487a984a292f52",
    ("student", "rand seed=0"): "26c7d316e20dd673",
    ("eval", "rand seed=0"): "2a0a94d985e3fee5",
    ("student", "other seed=0"): "d5497dfd3b6ae0ed",
    ("eval", "other seed=0"): "9227fe7425340cd5",
    ("student", "det seed=0"): "bd9ce74f24306dad",
    ("eval", "det seed=0"): "01b907d69ac8d3cf",
    ("student", "errors seed=0"): "f428613b0e05516c",
    ("eval", "errors seed=0"): "1fc08da9105520b4",
    ("run", "table"): "99ee9cca73f2ad76",
}


def test_tiny_profile_keys_are_pinned():
    from pipeline.plan import plan_summary

    got = {(r["stage"], r["what"]): r["key"] for r in plan_summary(make_plan(resolve("tiny"), "0" * 64))}
    assert got == TINY_KEYS
