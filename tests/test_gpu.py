"""CUDA paths. Skipped with a reason on machines without a GPU (CI, most laptops)."""

import pytest
import torch

from advfeatures.attacks import L2, pgd
from advfeatures.config import CIFAR_MEAN, CIFAR_STD, RuntimeConfig
from advfeatures.models import build_model
from pipeline.common import device_of

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_request_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from advfeatures.config import ConfigError

    with pytest.raises(ConfigError, match="CUDA is not available"):
        device_of(RuntimeConfig(device="cuda"))
    assert device_of(RuntimeConfig(device="auto")).type == "cpu"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", ["resnet18", "resnet9"])
def test_bf16_pgd_on_cuda_matches_fp32_fooling(arch):
    torch.manual_seed(0)
    m = build_model(arch, 10, CIFAR_MEAN, CIFAR_STD).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(256, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (256,), device="cuda")
    a = pgd(m, x, t, L2(0.5), 20, 0.1)
    b = pgd(m, x, t, L2(0.5), 20, 0.1, amp_dtype=torch.bfloat16)
    assert b.x.dtype == torch.float32
    assert ((b.x - x).flatten(1).norm(dim=1) <= 0.5 + 1e-4).all()
    assert abs(a.fooled.float().mean().item() - b.fooled.float().mean().item()) <= 0.02


@pytest.mark.gpu
@cuda
def test_training_on_cuda_is_seeded():
    from advfeatures.config import TrainConfig
    from advfeatures.training import fit

    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(256) % 10
    res = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("small_cnn", 10, CIFAR_MEAN, CIFAR_STD)
        fit(m, x, y, TrainConfig(epochs=1, batch_size=64, augment=True), device="cuda")
        res.append(next(m.parameters()).detach().cpu())
    assert torch.allclose(res[0], res[1], atol=1e-5)


@pytest.mark.gpu
@cuda
def test_random_streams_are_the_same_on_cuda_and_cpu():
    """Random numbers are drawn on the CPU, so the device is not in any key: the same crops and
    flips on both devices, and PGD random starts that do not depend on the device."""
    from advfeatures.training import augment_batch, robustness_augment

    x = torch.rand(64, 3, 32, 32)
    for aug in (augment_batch, robustness_augment):
        cpu = aug(x, torch.Generator().manual_seed(3))
        gpu = aug(x.cuda(), torch.Generator().manual_seed(3)).cpu()
        assert torch.allclose(cpu, gpu, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_inductor_compiled_model_matches_eager_on_cuda():
    """runtime.compile's default code generator (inductor) on a GPU: the same logits and input
    gradients as the eager model, to float noise (the CPU suite checks the wiring with AOTAutograd's
    eager generator: test_stages)."""
    torch.manual_seed(0)
    m = build_model("small_cnn", 10, CIFAR_MEAN, CIFAR_STD).cuda().eval()
    c = torch.compile(m)
    x = torch.rand(64, 3, 32, 32, device="cuda", requires_grad=True)
    a = m(x)
    (ga,) = torch.autograd.grad(a.sum(), x)
    b = c(x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    assert torch.allclose(a, b, atol=1e-3) and torch.allclose(ga, gb, atol=1e-3)
