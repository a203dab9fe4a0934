"""The deployment fan-out's bookkeeping: failed children are resubmitted with a new idempotency
key (scoped to parent run, set and attempt) and give up after runtime.shard_retries."""

import types
import uuid

import pytest

import flows.replicate as R
from advfeatures.config import RuntimeConfig
from pipeline.plan import StageSpec
from storage import arrays as A


class FakePrefect:
    """run_deployment + a client whose child runs end in scripted states."""

    def __init__(self, store_root, spec, script):
        self.script, self.submitted, self.runs = script, [], {}
        self.path = R.Store(store_root).path(spec.folder, spec.key)

    def run_deployment(self, name, timeout, as_subflow, idempotency_key, parameters):
        assert timeout == 0 and as_subflow
        shard = parameters["shard"]
        attempt = sum(1 for _, p in self.submitted if p["shard"] == shard)
        self.submitted.append((idempotency_key, parameters))
        outcome = self.script.get((shard, attempt), "COMPLETED")
        run = types.SimpleNamespace(id=uuid.uuid4())
        self.runs[run.id] = outcome
        if outcome == "COMPLETED":  # the worker wrote the shard's marker
            A.marker_path(self.path, shard).parent.mkdir(parents=True, exist_ok=True)
            A.marker_path(self.path, shard).write_text("{}")
        return run

    def read_flow_run(self, run_id):
        name = self.runs[run_id]
        state = types.SimpleNamespace(name=name, message="boom", is_final=lambda: True,
                                      is_completed=lambda: name == "COMPLETED")
        return types.SimpleNamespace(state=state)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    spec = StageSpec("construct", {"kind": "det"}, ("d", "s"))
    parent = uuid.uuid4()

    def install(script):
        fake = FakePrefect(str(tmp_path), spec, script)
        import prefect.client.orchestration
        import prefect.context
        import prefect.deployments

        monkeypatch.setattr(prefect.deployments, "run_deployment", fake.run_deployment)
        monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: fake)
        monkeypatch.setattr(prefect.context, "get_run_context",
                            lambda: types.SimpleNamespace(flow_run=types.SimpleNamespace(id=parent)))
        return fake

    return spec, parent, install, str(tmp_path)


def test_failed_and_crashed_children_are_resubmitted(setup):
    spec, parent, install, root = setup
    fake = install({(1, 0): "FAILED", (2, 0): "CRASHED", (2, 1): "FAILED"})
    R._fan_out(spec, root, RuntimeConfig(shard_retries=2), [0, 1, 2], poll=0)
    keys = [k for k, _ in fake.submitted]
    assert sorted(keys) == sorted([f"{parent}:{spec.key}:0:0", f"{parent}:{spec.key}:1:0",
                                   f"{parent}:{spec.key}:1:1", f"{parent}:{spec.key}:2:0",
                                   f"{parent}:{spec.key}:2:1", f"{parent}:{spec.key}:2:2"])
    assert len(set(keys)) == len(keys)


def test_gives_up_after_the_retries(setup):
    spec, parent, install, root = setup
    install({(0, 0): "FAILED", (0, 1): "FAILED"})
    with pytest.raises(RuntimeError, match="shard 0 of set .* failed 2 times"):
        R._fan_out(spec, root, RuntimeConfig(shard_retries=1), [0, 1], poll=0)


def test_completed_without_marker_counts_as_failed(setup, tmp_path):
    """A child that reports success but left no marker (e.g. wrote elsewhere) is not trusted."""
    spec, parent, install, root = setup
    fake = install({})
    original = fake.run_deployment

    def no_marker(*a, **k):
        run = original(*a, **k)
        A.marker_path(fake.path, k["parameters"]["shard"]).unlink()
        return run

    fake.run_deployment = no_marker
    import prefect.deployments

    prefect.deployments.run_deployment = no_marker
    with pytest.raises(RuntimeError, match="failed 1 times"):
        R._fan_out(spec, root, RuntimeConfig(shard_retries=0), [0], poll=0)
