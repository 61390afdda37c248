"""SEMU on real torchvision architectures (randomly initialised: no weights can be downloaded)."""
import pytest
import torch

import semu_fast as sf

torchvision = pytest.importorskip("torchvision")


def _batches(n=8, classes=10, size=32):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, size, size, generator=gen), torch.randint(0, classes, (n,), generator=gen))]


def test_resnet18_prepare_report_and_exact_identity_at_R_zero():
    model = torchvision.models.resnet18(num_classes=10)
    model.eval()
    x = _batches()[0][0]
    expected = model(x)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    sm = sf.prepare(model, _batches(), config=sf.SEMUConfig(gamma=0.95))
    assert len(sm.adapters) == convs + 1  # every conv and the fc head
    assert torch.equal(sm(x), expected)
    # At most full rank: R is in x min(out, kh*kw)^2 per conv (DESIGN: about 2.47% of a ResNet-18's weights).
    full = sum(m.in_channels * min(m.out_channels, m.kernel_size[0] * m.kernel_size[1]) ** 2
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)) + 10 * 10
    assert 0 < sm.report.trainable_params <= full
    assert sm.report.trainable_share < 2.6


def test_mobilenet_depthwise_convs_are_skipped_and_the_rest_adapted():
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.eval()
    sm = sf.prepare(model, _batches(n=4), config=sf.SEMUConfig(gamma=0.9))
    grouped = [n for n, m in sm.model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert grouped and not any(n in sm.adapters for n in grouped)
    assert len(sm.adapters) > 10
    sm2, report = sf.unlearn(sm.unload(), _batches(n=4), epochs=1, progress=False)
    assert report.training["history"]
