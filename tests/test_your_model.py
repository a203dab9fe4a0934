"""Your model, your checkpoint (docs/your-model.md): architectures from strings (timm, a user's module),
trained models from checkpoints (state dict, TorchScript, the robustness library's layout), their keys,
and the one-line errors before any work. Nothing is downloaded: every checkpoint is written here."""

import argparse
import textwrap

import pytest
import torch
from conftest import run_experiment

from advfeatures import archs, checkpoints
from advfeatures.config import resolve
from advfeatures.models import build_model
from flows.cli import main
from pipeline.plan import make_plan

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
FAST = ["construct.sets=[rand]", "construct.n_images=50", "source.train.epochs=1"]
"""The tiny replication, smaller still: one PGD set, one epoch each."""
SMALL = ["student.model.arch=small_cnn", "teacher.model.arch=small_cnn"]
"""Students (and a teacher) of the CPU demo's network: the source is what a test is about."""


def _x(n=6):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norm statistics away from 0/1, so a checkpoint that lost them predicts differently."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _module(tmp_path, monkeypatch, name, body):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


NET = """
    from torch import nn

    def build(num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, num_classes))
"""


# ---------------------------------------------------------------------------------------------
# The robustness library's ResNet-50, layer for layer


def test_robustness_resnet50_has_the_librarys_layout():
    sd = archs.robustness_resnet50(10).state_dict()
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 23_520_842
    assert tuple(sd["linear.weight"].shape) == (10, 2048) and tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    assert "layer1.0.shortcut.0.weight" in sd and "layer4.0.shortcut.1.running_var" in sd
    assert "layer1.1.shortcut.0.weight" not in sd  # an identity shortcut: an empty Sequential, no parameters
    assert [k for k in sd if k.startswith("layer3.5.")][0] == "layer3.5.conv1.weight"  # blocks [3, 4, 6, 3]
    assert not any(k.startswith("layer3.6.") or k.startswith("layer4.3.") for k in sd)


# ---------------------------------------------------------------------------------------------
# Each format written here loads into a model that predicts as the one that wrote it


def _write(fmt, tmp_path):
    """(path, arch, the model that wrote it as it predicts on [0, 1] images)."""
    path = tmp_path / f"{fmt}.pt"
    if fmt == "robustness":
        net = _randomised(archs.robustness_resnet50(10))
        sd = net.state_dict()
        norm = {"new_mean": torch.tensor(MEAN).view(3, 1, 1), "new_std": torch.tensor(STD).view(3, 1, 1)}
        model = {**{f"module.normalizer.{k}": v for k, v in norm.items()},
                 **{f"module.model.{k}": v for k, v in sd.items()},
                 **{f"module.attacker.model.{k}": v for k, v in sd.items()},
                 **{f"module.attacker.normalize.{k}": v for k, v in norm.items()}}
        torch.save({"model": model, "epoch": 150, "optimizer": {}, "schedule": None}, path)
        return path, "robustness_resnet50", build_model("robustness_resnet50", 10, MEAN, STD).eval(), net
    net = _randomised(build_model("resnet9_narrow", 10, MEAN, STD))
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(net.net), str(path))
    elif fmt == "state_dict":
        torch.save(net.net.state_dict(), path)
    else:  # a store's own weights.pt: the normalised model's state dict
        torch.save(net.state_dict(), path)
    return path, "resnet9_narrow", net, None


@pytest.mark.parametrize("fmt", ["state_dict", "normalized", "torchscript", "robustness"])
def test_each_format_loads_the_model_that_wrote_it(tmp_path, fmt):
    path, arch, reference, bare = _write(fmt, tmp_path)
    if bare is not None:
        reference.net.load_state_dict(bare.state_dict())
    model, info = checkpoints.load(str(path), arch, 10, MEAN, STD, "source")
    assert info["format"] == ("state_dict" if fmt == "normalized" else fmt)
    assert info["mean"] == pytest.approx(MEAN) and info["std"] == pytest.approx(STD)
    with torch.no_grad():
        x = _x()
        want, got = reference(x), model(x)
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


def test_a_pickle_needs_the_trusted_flag(tmp_path):
    path = tmp_path / "pickled.pt"
    net = build_model("small_cnn", 10, MEAN, STD)
    torch.save({"model": net.net.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)  # not weights-only
    with pytest.raises(checkpoints.CheckpointError, match=r"source.checkpoint_trusted=true"):
        checkpoints.load(str(path), "small_cnn", 10, MEAN, STD, "source")
    model, _ = checkpoints.load(str(path), "small_cnn", 10, MEAN, STD, "source", trusted=True)
    with torch.no_grad():
        assert torch.equal(model(_x()), net.eval()(_x()))


# ---------------------------------------------------------------------------------------------
# Keys


def test_a_checkpoint_replaces_the_recipe_in_the_key(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(build_model("small_cnn", 10, MEAN, STD).net.state_dict(), a)
    torch.save(build_model("small_cnn", 10, MEAN, STD).net.state_dict(), b)

    def plan(path, *over):
        return make_plan(resolve("tiny", [f"source.checkpoint={path}", *over]), "0" * 64)

    base = plan(a)
    assert "train" not in base.source.config and base.source.config["checkpoint"]["sha256"]
    assert plan(a, "source.train.epochs=7", "source.checkpoint_trusted=true").source.key == base.source.key
    assert plan(b).source.key != base.source.key  # other bytes, another source
    assert plan(b).teacher.key == base.teacher.key  # the teacher does not inherit the checkpoint
    assert base.source.options["checkpoint"] == str(a)
    moved = tmp_path / "moved.pt"
    a.rename(moved)
    assert plan(moved).source.key == base.source.key  # the path is not keyed


def _downstream(plan, key):
    out = {key}
    for s in plan.stages():
        if out & set(s.inputs):
            out.add(s.key)
    return out


def test_editing_your_module_recomputes_what_depends_on_it_only(tmp_path, monkeypatch):
    path = _module(tmp_path, monkeypatch, "yourmodel39", NET)
    over = ["source.model.arch=yourmodel39:build", "teacher.model.arch=small_cnn", "student.model.arch=small_cnn"]
    before = make_plan(resolve("tiny", over), "0" * 64)
    assert before.source.config["model"]["module_sha256"]
    path.write_text(path.read_text() + "\n# an edit\n")
    after = make_plan(resolve("tiny", over), "0" * 64)
    changed = {s.key for s in before.stages()} - {s.key for s in after.stages()}
    assert before.source.key in changed and before.teacher.key not in changed
    assert changed == _downstream(before, before.source.key) - {s.key for s in after.stages()}
    assert changed == _downstream(before, before.source.key)  # everything downstream, nothing else
    plain = make_plan(resolve("tiny", []), "0" * 64)
    assert "module_sha256" not in plain.source.config["model"]  # other archs' keys as they were


# ---------------------------------------------------------------------------------------------
# End to end: the tiny replication with a timm model, a user's module and a checkpoint


def _ran(cfg, st, plan):
    run = st.path(plan.run.folder, plan.run.key)
    assert (run / "table.md").is_file()
    return (run / "table.md").read_text()


def test_a_timm_model_runs_the_tiny_replication(tmp_path, tiny_tar):
    pytest.importorskip("timm")
    cfg, st, plan = run_experiment("replicate", ["source.model.arch=timm/test_efficientnet", *FAST, *SMALL], tmp_path,
                                   tiny_tar)
    assert plan.source.config["model"]["arch"] == "timm/test_efficientnet"
    assert "timm/test_efficientnet" in _ran(cfg, st, plan)


def test_your_module_runs_the_tiny_replication(tmp_path, tiny_tar, monkeypatch):
    _module(tmp_path, monkeypatch, "yourmodel39b", NET)
    cfg, st, plan = run_experiment("replicate", ["source.model.arch=yourmodel39b:build", *FAST], tmp_path / "s",
                                   tiny_tar)
    assert "yourmodel39b:build" in _ran(cfg, st, plan)


def test_a_checkpoint_source_runs_and_is_named_in_the_table(tmp_path, tiny_tar):
    path, arch, reference, _ = _write("torchscript", tmp_path)
    over = [f"source.checkpoint={path}", f"source.model.arch={arch}", f"source.model.mean={list(MEAN)}",
            f"source.model.std={list(STD)}", "evaluate.robust_eps=[0.25]", "evaluate.robust_steps=2", *FAST, *SMALL]
    cfg, st, plan = run_experiment("replicate", over, tmp_path / "s", tiny_tar)
    table = _ran(cfg, st, plan)
    assert "checkpoint torchscript.pt, torchscript" in table and "robust_acc_eps0.25" in table
    from pipeline.common import load_model

    with torch.no_grad():
        assert torch.allclose(load_model(st, plan.source.key)(_x()), reference(_x()), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any work, nothing in the store


def _fails(capsys, tmp_path, tiny_tar, match, *sets):
    store = tmp_path / "store"
    argv = ["run", "--profile", "tiny", "--data", str(tiny_tar), "--store", str(store)]
    rc = main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert not store.exists() or not any(store.rglob("*"))
    return err


def test_a_missing_checkpoint(capsys, tmp_path, tiny_tar):
    _fails(capsys, tmp_path, tiny_tar, "source.checkpoint=/nonexistent/model.pt: no such file",
           "source.checkpoint=/nonexistent/model.pt")


def test_a_checkpoint_that_does_not_fit_names_its_keys(capsys, tmp_path, tiny_tar):
    path = tmp_path / "cnn.pt"
    torch.save(build_model("small_cnn", 10, MEAN, STD).net.state_dict(), path)
    err = _fails(capsys, tmp_path, tiny_tar, "keys do not fit model.arch=resnet18", f"source.checkpoint={path}",
                 "source.model.arch=resnet18")
    assert "missing (first: stem.0.weight)" in err and "unexpected (first: 0.weight)" in err


def test_a_robustness_checkpoint_in_the_wrong_arch_says_which(capsys, tmp_path, tiny_tar):
    path = tmp_path / "r.pt"
    torch.save({"model": {f"module.model.{k}": v for k, v in archs.robustness_resnet18(10).state_dict().items()}},
               path)
    _fails(capsys, tmp_path, tiny_tar, "needs model.arch=robustness_resnet50", f"source.checkpoint={path}")


def test_a_pickle_without_the_trusted_flag(capsys, tmp_path, tiny_tar):
    path = tmp_path / "pickled.pt"
    torch.save({"model": build_model("small_cnn", 10, MEAN, STD).net.state_dict(), "args": argparse.Namespace()},
               path)
    _fails(capsys, tmp_path, tiny_tar, "set source.checkpoint_trusted=true", f"source.checkpoint={path}")


def test_a_timm_name_that_does_not_exist(capsys, tmp_path, tiny_tar):
    pytest.importorskip("timm")
    _fails(capsys, tmp_path, tiny_tar, "did you mean timm/resnet18", "source.model.arch=timm/resnet181")


def test_a_timm_model_that_cannot_run_at_32(capsys, tmp_path, tiny_tar):
    pytest.importorskip("timm")
    _fails(capsys, tmp_path, tiny_tar, "cannot run on the data's 32x32 images",
           "student.model.arch=timm/vit_tiny_patch16_224")


def test_a_module_that_does_not_import(capsys, tmp_path, tiny_tar):
    _fails(capsys, tmp_path, tiny_tar, "cannot import module 'nosuchpackage39.net'",
           "source.model.arch=nosuchpackage39.net:build")


def test_a_module_that_raises_on_import(capsys, tmp_path, tiny_tar, monkeypatch):
    _module(tmp_path, monkeypatch, "broken39", "raise RuntimeError('half-written')\n")
    _fails(capsys, tmp_path, tiny_tar, "importing broken39 fails: RuntimeError: half-written",
           "source.model.arch=broken39:build")


def test_a_factory_that_does_not_make_a_module(capsys, tmp_path, tiny_tar, monkeypatch):
    _module(tmp_path, monkeypatch, "notamodule39", "def build(num_classes):\n    return 'a string'\n")
    _fails(capsys, tmp_path, tiny_tar, "returned str, not a torch.nn.Module", "source.model.arch=notamodule39:build")


def test_robustbench_without_the_package(capsys, tmp_path, tiny_tar):
    try:
        import robustbench.utils  # noqa: F401
        pytest.skip("robustbench imports here")
    except Exception:  # noqa: BLE001 - absent, or (as in this project's venv) without pkg_resources
        pass
    _fails(capsys, tmp_path, tiny_tar, "needs the robustbench package, which",
           "source.model.arch=robustbench/Rebuffi2021Fixing_70_16_cutmix_extra")


def test_the_per_set_and_transfer_names_are_checked_too():
    with pytest.raises(Exception, match="transfer.archs\\[1\\]='nope' is unknown"):
        resolve("tiny", ["transfer.archs=[small_cnn, nope]"])
