import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advfeatures.attacks import L2, Linf, frozen_eval, pgd, threat_model
from advfeatures.config import CIFAR_MEAN, CIFAR_STD
from advfeatures.models import build_model


def _setup(seed=0, n=16):
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, CIFAR_MEAN, CIFAR_STD)
    model.train()  # pgd must switch to eval itself
    x = torch.rand(n, 3, 32, 32)
    t = torch.randint(0, 10, (n,))
    return model, x, t


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("l2", 2.0), ("linf", 8 / 255)])
def test_result_inside_eps_ball_and_unit_box(norm, eps):
    model, x, t = _setup()
    r = pgd(model, x, t, threat_model(norm, eps), steps=10, step_size=eps / 2)
    d = (r.x - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
    assert (size <= eps + 1e-5).all()
    assert r.x.min() >= 0 and r.x.max() <= 1
    assert torch.allclose(r.norm, size, atol=1e-5)
    assert size.max() > 0.5 * eps  # it did move


@pytest.mark.parametrize("threat", [L2(0.0), Linf(0.0)])
def test_eps_zero_returns_input(threat):
    model, x, t = _setup()
    r = pgd(model, x, t, threat, steps=5, step_size=0.1)
    assert torch.equal(r.x, x)
    assert (r.norm == 0).all()


@pytest.mark.parametrize("use_best", [True, False])
def test_targeted_loss_does_not_increase(use_best):
    model, x, t = _setup()
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x), t, reduction="none")
    r = pgd(model, x, t, L2(0.5), steps=20, step_size=0.05, use_best=use_best)
    with torch.no_grad():
        after = F.cross_entropy(model(r.x), t, reduction="none")
    assert torch.allclose(after, r.loss, atol=1e-5)
    if use_best:  # guaranteed per example: the start is a candidate
        assert (after <= before + 1e-6).all()
    assert after.mean() < before.mean() - 0.1
    assert torch.equal(r.fooled, model(r.x).argmax(1) == t)


def test_use_best_keeps_the_lowest_loss_iterate():
    model, x, t = _setup()
    best = pgd(model, x, t, L2(0.5), steps=15, step_size=0.3, use_best=True)
    last = pgd(model, x, t, L2(0.5), steps=15, step_size=0.3, use_best=False)
    assert (best.loss <= last.loss + 1e-6).all()


def test_one_l2_step_on_linear_model_equals_closed_form():
    torch.manual_seed(1)
    lin = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.5 + 0.01 * torch.randn(6, 3, 4, 4)  # far from the box bounds
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha = 0.05
    with torch.no_grad():
        p = torch.softmax(lin(x.flatten(1)), 1)
        g = (p - F.one_hot(t, 5).float()) @ lin.weight  # dCE/dx = W^T (softmax - e_t)
        expected = x.flatten(1) - alpha * g / g.norm(dim=1, keepdim=True)
    r = pgd(model, x, t, L2(10.0), steps=1, step_size=alpha, use_best=False)
    assert torch.allclose(r.x.flatten(1), expected, atol=1e-6)
    r_inf = pgd(model, x, t, Linf(10.0), steps=1, step_size=alpha, use_best=False)
    assert torch.allclose(r_inf.x.flatten(1), x.flatten(1) - alpha * g.sign(), atol=1e-6)


def test_l2_projection_scales_onto_the_sphere():
    d = torch.randn(4, 3, 8, 8)
    p = L2(0.5).project(d)
    assert torch.allclose(p.flatten(1).norm(dim=1), torch.full((4,), 0.5), atol=1e-6)
    small = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 0.1
    assert torch.equal(L2(0.5).project(small), small)


def test_weights_frozen_eval_mode_and_state_restored():
    model, x, t = _setup()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    pgd(model, x, t, L2(0.5), steps=3, step_size=0.1)
    assert torch.equal(bn.running_mean, stats)  # BatchNorm was in eval mode
    assert all(p.grad is None for p in model.parameters())  # no weight gradients taken
    assert model.training and all(p.requires_grad for p in model.parameters())
    with frozen_eval(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_random_start_is_seeded_and_inside_ball():
    model, x, t = _setup()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = pgd(model, x, t, L2(0.5), steps=0, step_size=0.1, random_start=True, use_best=False, generator=g1)
    b = pgd(model, x, t, L2(0.5), steps=0, step_size=0.1, random_start=True, use_best=False, generator=g2)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, x)
    assert (a.norm <= 0.5 + 1e-5).all()


def test_bf16_autocast_keeps_x_fp32_and_rechecks_records_in_fp32():
    """The CUDA fast path, exercised on CPU: only the model runs in bf16."""
    model, x, t = _setup()
    r = pgd(model, x, t, L2(0.5), steps=5, step_size=0.1, amp_dtype=torch.bfloat16)
    assert r.x.dtype == torch.float32 and r.loss.dtype == torch.float32
    assert ((r.x - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and r.x.min() >= 0 and r.x.max() <= 1
    model.eval()
    with torch.no_grad():
        logits = model(r.x)  # fp32
    assert torch.allclose(r.loss, F.cross_entropy(logits, t, reduction="none"), atol=1e-5)
    assert torch.equal(r.fooled, logits.argmax(1) == t)
    # the perturbation is resolved finer than bf16 could hold it
    d = (r.x - x)[r.norm > 0]
    assert not torch.equal(d, d.to(torch.bfloat16).float())
    fp32 = pgd(model, x, t, L2(0.5), steps=5, step_size=0.1)
    assert abs(r.fooled.float().mean() - fp32.fooled.float().mean()) <= 0.15


class _FlatThenSteep(torch.nn.Module):
    """Class 0 while every pixel is within tau of grey: s = 1 - k * sum relu(|x - 0.5| - tau). At
    an all-grey image the gradient is zero, so PGD from the image never moves; from a random start
    in the ball most pixels are past tau, and the gradient leads out of class 0."""

    def __init__(self, tau=0.01, k=10.0):
        super().__init__()
        self.tau, self.k = tau, k
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        s = 1 - self.k * torch.relu((x - 0.5).abs() - self.tau).flatten(1).sum(1) + 0 * self.dummy
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_random_restarts_find_what_the_attack_from_the_image_cannot():
    from advfeatures.attacks import L2, robust_predictions, strongest_predictions

    x, y = torch.full((6, 3, 4, 4), 0.5), torch.zeros(6, dtype=torch.long)
    model = _FlatThenSteep()
    assert (robust_predictions(model, x, y, L2(0.5), 20, 0.0625) == 0).all()  # robust to the plain attack
    preds = strongest_predictions(model, x, y, L2(0.5), 40, 2.5 * 0.5 / 40, restarts=2, seed=0)
    assert preds.shape == (3, 6)
    assert (preds[0] == 0).all() and (preds[1:] == 1).all()  # every restart fools it
    # the starts come from the seed over the whole input, not from the batch
    assert torch.equal(preds, strongest_predictions(model, x, y, L2(0.5), 40, 2.5 * 0.5 / 40, 2, 0, batch_size=4))


def test_each_attack_of_the_check_runs_only_on_points_no_earlier_one_fooled():
    """Grey images are fooled by the first random start, so a second restart has nothing left to
    attack: it costs no forward pass, and its row repeats the fooling prediction. A point masked
    out by ``alive`` (fooled before the check) is never attacked."""
    from advfeatures.attacks import L2, strongest_predictions

    class Counting(_FlatThenSteep):
        seen = 0

        def forward(self, x):
            Counting.seen += len(x)
            return super().forward(x)

    x, y = torch.full((6, 3, 4, 4), 0.5), torch.zeros(6, dtype=torch.long)
    one = strongest_predictions(Counting(), x, y, L2(0.5), 10, 0.125, restarts=1, seed=0)
    cost_one, Counting.seen = Counting.seen, 0
    two = strongest_predictions(Counting(), x, y, L2(0.5), 10, 0.125, restarts=2, seed=0)
    assert Counting.seen == cost_one and torch.equal(two[:2], one) and torch.equal(two[2], one[1])
    Counting.seen = 0
    alive = torch.tensor([True, False, True, False, True, False])
    part = strongest_predictions(Counting(), x, y, L2(0.5), 10, 0.125, restarts=1, seed=0, alive=alive)
    assert Counting.seen == cost_one // 2 and torch.equal(part[:, alive], one[:, alive])
    assert (part[:, ~alive] == 0).all()  # left out, unattacked: their label (no prior given)
    prior = torch.ones(6, dtype=torch.long)
    part = strongest_predictions(Counting(), x, y, L2(0.5), 10, 0.125, restarts=1, seed=0, alive=alive, prior=prior)
    assert (part[:, ~alive] == 1).all()  # their prior (fooling) prediction in every row


def test_the_strength_check_counts_a_point_robust_only_if_no_attack_fools_it():
    import numpy as np

    from advfeatures.config import EvaluateConfig, RuntimeConfig
    from pipeline.stages.evaluation import strength_check

    x, y = np.full((5, 3, 4, 4), 128, np.uint8), np.zeros(5, np.int64)  # grey: within tau of 0.5 (the check_n picked)
    a = EvaluateConfig(robust_steps=10, check_restarts=2, check_n=5).check_for(0.5)
    pred, m = strength_check(_FlatThenSteep(), x, y, a, RuntimeConfig(device="cpu"), "cpu", None)
    assert len(pred) == 5 and m["n_checked"] == 5 and (pred.numpy() == 1).all()
    assert m["acc_base"] == 1.0 and m["strength_drop"] == 1.0 and m["acc_after_each_attack"] == [1.0, 1.0, 0.0, 0.0]
    assert a["steps"] == 20 and a["base"]["steps"] == 10
