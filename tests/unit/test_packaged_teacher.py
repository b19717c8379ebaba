"""The packaged Fashion-MNIST teacher loads offline and is a sensible class-conditional denoiser."""

import torch

from diffdistill.models import Conditioning, Teacher
from diffdistill.utils.paths import ASSETS


def test_packaged_teacher_loads_offline(no_network):
    t = Teacher.from_pretrained("fashion_mnist")
    assert t.sample_shape == (1, 32, 32) and t.num_classes == 10
    assert not any(p.requires_grad for p in t.parameters())
    size = (ASSETS / "teachers" / "fashion_mnist" / "model.safetensors").stat().st_size
    assert size < 20 * 2**20


def test_packaged_teacher_denoises_and_uses_labels():
    torch.manual_seed(0)
    t = Teacher.from_pretrained("fashion_mnist")

    # denoising at a small sigma must beat the identity on real-looking inputs: use the teacher's own clean output
    x0 = t(torch.randn(8, 1, 32, 32) * 80, 80.0, Conditioning(class_labels=torch.arange(8)))
    assert x0.abs().max() < 1.5  # a clean-image estimate in roughly [-1, 1]
    x = x0 + 0.3 * torch.randn_like(x0)
    err_teacher = (t(x, 0.3, Conditioning(class_labels=torch.arange(8))) - x0).pow(2).mean()
    err_identity = (x - x0).pow(2).mean()
    assert err_teacher < 0.5 * err_identity
    # the label changes the prediction at high noise (class-conditional), the null class is the CFG branch
    z = torch.randn(1, 1, 32, 32) * 20
    preds = [t(z, 20.0, Conditioning(class_labels=torch.tensor([k]))) for k in (1, 9)]
    assert (preds[0] - preds[1]).abs().mean() > 0.05
