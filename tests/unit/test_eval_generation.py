"""Per-sample seeding: images depend on (model, seed, index) only; generator path == folder path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diffdistill.evaluation import build_extractor, folder_features, generate, save_images
from diffdistill.evaluation.generation import per_sample_noise, sampler_spec
from diffdistill.models import Conditioning, GaussianDenoiser, Generator, Teacher
from diffdistill.models.denoiser import Denoiser


class LabelDenoiser(Denoiser):
    """A class-conditional toy denoiser: shrinks x towards a label-dependent constant."""

    num_classes = 10

    def __init__(self, shape=(1, 8, 8)):
        super().__init__()
        self.shape, self.sigma_data, self.sigma_min, self.sigma_max = shape, 0.5, 0.002, 80.0
        self.scale = torch.nn.Parameter(torch.ones(()))

    @property
    def sample_shape(self):
        return self.shape

    def denoise(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        c = (cond.class_labels.float() / 10 - 0.5).view(-1, 1, 1, 1)
        w = 0.25 / (0.25 + sigma.view(-1, 1, 1, 1) ** 2)
        return self.scale * (c + w * (x - c))


def _gauss(shape=(1, 8, 8)) -> GaussianDenoiser:
    return GaussianDenoiser(torch.zeros(shape), torch.full(shape, 0.5))


@pytest.mark.parametrize("kind", ["one_step", "multistep", "teacher"])
def test_batch_size_independent(kind):
    if kind == "teacher":
        model = Teacher(_gauss())
        kw = {"steps": 3}
    elif kind == "one_step":
        model, kw = Generator(_gauss(), sigma_init=1.0), {}
    else:
        model, kw = Generator(_gauss(), sigma_init=1.0, sampling_sigmas=[1.0, 0.5, 0.2]), {}
    a = generate(model, 10, seed=7, batch_size=3, **kw)
    b = generate(model, 10, seed=7, batch_size=10, **kw)
    c = generate(model, 4, seed=7, batch_size=4, start=6, **kw)  # a slice, as another device would do
    assert a.dtype == torch.uint8 and a.shape == (10, 1, 8, 8)
    assert torch.equal(a, b) and torch.equal(a[6:], c)
    assert not torch.equal(a, generate(model, 10, seed=8, batch_size=5, **kw))
    assert a.float().std() > 1.0  # not constant


def test_noise_is_per_index():
    n1 = per_sample_noise(range(5), (3,), seed=0, num_draws=2)
    n2 = per_sample_noise([3, 4], (3,), seed=0, num_draws=2)
    assert torch.equal(n1[0][3:], n2[0]) and torch.equal(n1[1][3:], n2[1])
    assert torch.equal(n1[0][1], torch.randn(3, generator=torch.Generator().manual_seed(1)))


def test_sampler_spec():
    gen = Generator(_gauss(), sigma_init=80.0, sampling_sigmas=[80.0, 2.0])
    assert sampler_spec(gen).kind == "multistep" and sampler_spec(gen).steps == 2
    assert sampler_spec(gen, steps=1).kind == "one_step"
    with pytest.raises(ValueError, match="sampling sigmas"):
        sampler_spec(gen, steps=3)
    spec = sampler_spec(Teacher(_gauss()), steps=18)
    assert spec.kind == "heun" and spec.steps == 18 and spec.sigmas[0] == pytest.approx(80.0)
    assert spec.sigmas[-1] == 0.0


def test_class_labels_cycle_and_training_mode_restored():
    gen = Generator(LabelDenoiser(), sigma_init=80.0).train()
    imgs = generate(gen, 20, seed=0, batch_size=6)
    assert gen.training  # restored
    # at sigma_init = 80 the output is ~ the label constant: sample i has class i % 10
    means = imgs.float().mean(dim=(1, 2, 3))
    assert torch.allclose(means[:10], means[10:], atol=1.0)
    assert (means[1:10] > means[:9]).all()


def test_generator_path_equals_folder_path(tmp_path):
    gen = Generator(_gauss(), sigma_init=1.0)
    images = generate(gen, 24, seed=3, batch_size=7)
    ex = build_extractor("random_cnn", input_size=16, feature_dim=16)
    from_tensor = ex.extract(images, batch_size=5)
    folder = save_images(images, tmp_path / "imgs")
    from_folder = folder_features(folder, ex, batch_size=8)
    assert from_tensor.shape == (24, 16)
    assert torch.allclose(torch.from_numpy(from_tensor), torch.from_numpy(from_folder), atol=1e-5)
