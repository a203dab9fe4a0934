import pytest
import torch

from advfeatures.config import CIFAR_MEAN, CIFAR_STD
from advfeatures.models import MODELS, build_model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_backward_finite(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, CIFAR_MEAN, CIFAR_STD)
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_normalisation_lives_inside_the_model():
    model = build_model("small_cnn", 10, CIFAR_MEAN, CIFAR_STD).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = model.net((x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
    assert torch.allclose(model(x), manual, atol=1e-6)


def test_parameter_counts_match_their_names():
    count = {a: sum(p.numel() for p in build_model(a, 10, CIFAR_MEAN, CIFAR_STD).parameters()) for a in MODELS}
    assert 80_000 < count["small_cnn"] < 120_000
    assert 350_000 < count["cnn_wide"] < 420_000
    assert 6_000_000 < count["resnet9"] < 7_000_000
    assert 400_000 < count["resnet9_narrow"] < 420_000 and count["resnet9"] == pytest.approx(16 * count["resnet9_narrow"], rel=0.01)
    assert 1_700_000 < count["mlp"] < 1_720_000
    assert 11_000_000 < count["resnet18"] < 11_400_000  # CIFAR ResNet-18: 11.17 M
    assert 23_000_000 < count["resnet50"] < 24_000_000  # CIFAR ResNet-50: 23.5 M


def test_unknown_arch():
    from advfeatures.archs import ArchError

    with pytest.raises(ArchError, match="choose one of"):
        build_model("vgg", 10, CIFAR_MEAN, CIFAR_STD)
