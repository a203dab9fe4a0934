import dataclasses

import numpy as np
import pytest
import torch

from advfeatures.config import CIFAR_MEAN, CIFAR_STD, TrainConfig
from advfeatures.models import build_model
from advfeatures.training import (
    augment_batch, color_jitter, fit, lr_lambda, predict, robustness_augment, rotate, wilson_interval,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, CIFAR_MEAN, CIFAR_STD)


def _random_64():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 10, (64,), generator=g)


# 64 random images with random labels: memorised in ~8 epochs at this lr (loss 3.3 -> 0.02)
OVERFIT = TrainConfig(epochs=10, batch_size=16, lr=0.01, schedule="constant", augment=False, weight_decay=0)


def test_loss_falls_when_overfitting_64_examples():
    x, y = _random_64()
    res = fit(_model(), x, y, OVERFIT)
    assert res.history[-1]["train_loss"] < 0.1 * res.history[0]["train_loss"]
    assert res.history[-1]["train_acc"] > 0.9


def test_fixed_seed_reproduces_bit_for_bit():
    x = torch.rand(96, 3, 32, 32)
    y = torch.arange(96) % 10
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, augment=True, seed=5)
    a, b, c = _model(), _model(), _model()
    fit(a, x, y, cfg)
    fit(b, x, y, cfg)
    fit(c, x, y, TrainConfig(**{**cfg.__dict__, "seed": 6}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_augment_is_a_shifted_or_flipped_copy():
    x = torch.rand(64, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    found = 0
    for i in range(64):  # each output equals some crop of the zero-padded image, maybe flipped
        xp = torch.nn.functional.pad(x[i], (4, 4, 4, 4))
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if torch.equal((out[i].flip(2) if f else out[i]), xp[:, dy:dy + 32, dx:dx + 32])]
        found += bool(hits)
    assert found == 64
    assert not torch.equal(out, x)


def test_schedules():
    step = lr_lambda(TrainConfig(epochs=9, schedule="step", step_epochs=3, gamma=0.1), steps_per_epoch=10)
    assert step(0) == 1 and step(29) == 1 and step(30) == pytest.approx(0.1) and step(89) == pytest.approx(0.01)
    one = lr_lambda(TrainConfig(epochs=10, schedule="onecycle", warmup=0.2), steps_per_epoch=10)
    vals = [one(i) for i in range(100)]
    assert max(vals) == pytest.approx(1.0) and vals[0] < 0.1 and vals[-1] < 0.02
    assert np.argmax(vals) == 19


def test_predict_matches_argmax_and_wilson():
    m = _model().eval()
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    p = predict(m, x, batch_size=7)
    with torch.no_grad():
        assert torch.equal(p, m(x.float() / 255).argmax(1))
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_empty_or_mismatched_data_is_refused():
    with pytest.raises(ValueError, match="empty"):
        fit(_model(), torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="rows"):
        fit(_model(), torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.long), TrainConfig(epochs=1))


@pytest.mark.slow
def test_bf16_autocast_training_learns_and_keeps_fp32_weights():
    """Under bf16 autocast the model still memorises the 64 examples, its weights stay fp32, and
    its loss follows fp32 training's epoch by epoch without being the same arithmetic."""
    x, y = _random_64()
    cfg = dataclasses.replace(OVERFIT, epochs=6)
    m, ref = _model(), _model()
    res = fit(m, x, y, cfg, amp_dtype=torch.bfloat16)
    fp32 = fit(ref, x, y, cfg)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert res.history[-1]["train_loss"] < 0.2 * res.history[0]["train_loss"] and res.history[-1]["train_acc"] > 0.9
    for got, want in zip(res.history, fp32.history):  # measured: within 0.05 at every epoch
        assert abs(got["train_loss"] - want["train_loss"]) <= 0.1 + 0.25 * want["train_loss"], (got, want)
    assert not all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))  # autocast was on


def test_color_jitter_matches_torchvision_in_each_examples_order():
    """Our batched ColorJitter equals torchvision's adjust_brightness/contrast/saturation, applied
    per example with the same factors in the same order."""
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 32, 32, generator=g)
    factors = 0.75 + 0.5 * torch.rand(12, 3, generator=g)
    order = torch.stack([torch.randperm(3, generator=g) for _ in range(12)])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = color_jitter(x, factors, order)
    for i in range(12):
        ref = x[i]
        for op in order[i].tolist():
            ref = ops[op](ref, factors[i, op].item())
        assert torch.allclose(out[i], ref, atol=1e-5), i


@pytest.mark.parametrize("degrees", [2.0, -1.5, 30.0])
def test_rotate_matches_torchvision(degrees):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = rotate(x, torch.full((4,), degrees))
    ref = TF.rotate(x, degrees, interpolation=InterpolationMode.NEAREST)
    assert (out == ref).float().mean() >= 0.99  # nearest-neighbour ties at a few pixels at most
    assert torch.equal(rotate(x, torch.zeros(4)), x)


def test_robustness_augmentation_is_seeded_and_stays_in_range():
    x = torch.rand(32, 3, 32, 32)
    a = robustness_augment(x, torch.Generator().manual_seed(0))
    b = robustness_augment(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, c)  # jitter and rotation on top of the same crop + flip
    m = _model()
    fit(m, (x * 255).to(torch.uint8), torch.arange(32) % 10, TrainConfig(epochs=1, batch_size=16, augment="robustness"))


def test_data_order_and_augmentation_come_from_the_given_seed():
    """fit(seed=...) seeds shuffling and augmentation (the stage passes the role-derived seed)."""
    x = torch.rand(64, 3, 32, 32)
    y = torch.arange(64) % 10
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, augment=True, seed=0)
    a, b, c = _model(), _model(), _model()
    fit(a, x, y, cfg, seed=11)
    fit(b, x, y, cfg, seed=11)
    fit(c, x, y, cfg, seed=12)
    assert torch.equal(next(a.parameters()), next(b.parameters()))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
