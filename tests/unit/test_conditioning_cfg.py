"""Classifier-free guidance defined once on ``Conditioning``: labels, prompts, negative prompts; the prior scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.denoiser import Denoiser
from diffdistill.models.generator import Generator
from diffdistill.models.teacher import Teacher, can_guide
from diffdistill.objectives.edm import EDMDenoising

L, D = 3, 4


class PromptDenoiser(Denoiser):
    """``x0_hat = x * scale + mean(prompt_embeds) + pooled.sum()``: the output depends on every prompt field."""

    def __init__(self, pooled: bool = False, vp_prior: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("null_embeds", torch.randn(1, L, D, generator=g))
        self.register_buffer("null_pooled", torch.randn(1, D, generator=g) if pooled else None)
        self.vp_prior = vp_prior

    @property
    def null_prompt(self):
        return Conditioning(prompt_embeds=self.null_embeds, pooled_prompt_embeds=self.null_pooled)

    @property
    def sample_shape(self):
        return (2,)

    def prior_std(self, sigma):
        return (1 + sigma**2) ** 0.5 if self.vp_prior else sigma

    def denoise(self, x, sigma, cond):
        emb = cond.prompt_embeds if cond.prompt_embeds is not None else self.null_embeds.expand(x.shape[0], L, D)
        out = x * self.scale + emb.mean(dim=(1, 2))[:, None]
        if cond.pooled_prompt_embeds is not None:
            out = out + cond.pooled_prompt_embeds.sum(1)[:, None]
        return out


def _prompts(n: int, pooled: bool = False, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        prompt_embeds=torch.randn(n, L, D, generator=g),
        pooled_prompt_embeds=torch.randn(n, D, generator=g) if pooled else None,
    )


def test_unconditional_labels_and_nothing_to_guide():
    cond = Conditioning(class_labels=torch.tensor([0, 3]))
    assert torch.equal(cond.unconditional(null_class=10).class_labels, torch.tensor([10, 10]))
    assert cond.unconditional(null_class=None) is None  # a class model without a null class
    assert Conditioning().unconditional(null_class=10, null_prompt=None) is None


@pytest.mark.parametrize("pooled", [False, True])
def test_unconditional_prompts_use_the_null_prompt_broadcast(pooled):
    den = PromptDenoiser(pooled)
    cond = _prompts(5, pooled)
    u = den.uncond(cond)
    assert torch.equal(u.prompt_embeds, den.null_embeds.expand(5, L, D))
    if pooled:
        assert torch.equal(u.pooled_prompt_embeds, den.null_pooled.expand(5, D))
    assert u.negative_prompt_embeds is None


def test_negative_prompts_replace_the_null_prompt_and_are_never_fed_to_the_network():
    den = PromptDenoiser(pooled=True)
    cond = _prompts(2, pooled=True)
    neg = _prompts(2, pooled=True, seed=7)
    cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = neg.prompt_embeds, neg.pooled_prompt_embeds
    u = den.uncond(cond)
    assert torch.equal(u.prompt_embeds, neg.prompt_embeds) and torch.equal(
        u.pooled_prompt_embeds, neg.pooled_prompt_embeds
    )
    assert cond.without_negative().negative_prompt_embeds is None
    only_embeds = Conditioning(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=neg.prompt_embeds,
    )
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        den.uncond(only_embeds)


def test_null_prompt_of_the_wrong_shape_is_a_clear_error():
    den = PromptDenoiser()
    cond = Conditioning(prompt_embeds=torch.randn(2, L + 1, D))
    with pytest.raises(ValueError, match="do not match the prompt embeddings"):
        den.uncond(cond)


@pytest.mark.parametrize("pooled", [False, True])
def test_teacher_guides_prompts_like_labels(pooled):
    den = PromptDenoiser(pooled)
    x, sigma = torch.randn(3, 2), torch.full((3,), 0.7)
    cond = _prompts(3, pooled)
    teacher = Teacher(den, guidance_scale=4.0)
    c, u = den(x, sigma, cond), den(x, sigma, den.uncond(cond))
    # (Ho & Salimans 2022, Eq. 6 in x0 form) x0_u + w (x0_c - x0_u)
    assert torch.allclose(teacher(x, sigma, cond), u + 4.0 * (c - u), atol=1e-6)
    assert not torch.allclose(teacher(x, sigma, cond), teacher(x, sigma, cond, guidance_scale=1.0))
    assert teacher.guides(cond) and not teacher.guides(cond, 1.0) and not teacher.guides(Conditioning(), 4.0)
    assert can_guide(teacher) and not can_guide(nn.Linear(1, 1))


def test_negative_prompt_changes_the_guided_output():
    den = PromptDenoiser()
    teacher = Teacher(den, guidance_scale=3.0)
    x, sigma, cond = torch.randn(2, 2), torch.full((2,), 1.0), _prompts(2)
    neg = Conditioning(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=_prompts(2, seed=9).prompt_embeds)
    c, u = den(x, sigma, cond), den(x, sigma, Conditioning(prompt_embeds=neg.negative_prompt_embeds))
    assert torch.allclose(teacher(x, sigma, neg), u + 3.0 * (c - u), atol=1e-6)


def test_prior_std_sets_the_one_step_input():
    z = torch.randn(4, 2)
    for vp in (False, True):
        gen = Generator(PromptDenoiser(vp_prior=vp), sigma_init=14.6)
        scale = (1 + 14.6**2) ** 0.5 if vp else 14.6
        assert torch.allclose(gen.noise_input(z, 14.6), scale * z)
        assert torch.allclose(gen.noise_input(z, torch.full((4,), 14.6)), scale * z)
        seen = {}
        gen.denoiser.denoise = lambda x, s, c, seen=seen: seen.setdefault("x", x)
        gen(z)
        assert torch.allclose(seen["x"], scale * z)


def test_edm_dropout_replaces_prompts_by_the_null_prompt():
    den = PromptDenoiser()
    gen = Generator(den, sigma_init=80.0)
    obj = EDMDenoising(gen, label_dropout=0.5)
    torch.manual_seed(0)
    cond = _prompts(400)
    out = obj.drop_labels(cond)
    dropped = (out.prompt_embeds == den.null_embeds).all(dim=(1, 2))
    kept = (out.prompt_embeds == cond.prompt_embeds).all(dim=(1, 2))
    assert bool((dropped ^ kept).all())  # each sample is either its own prompt or the null prompt
    assert 0.4 < float(dropped.float().mean()) < 0.6
    loss = obj.generator_loss(Batch(torch.randn(400, 2), cond), 0).loss
    assert loss.shape == (400,) and torch.isfinite(loss).all()
