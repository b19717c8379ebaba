"""The fused EMA update (``torch._foreach_lerp_``) equals the per-parameter loop and keeps a LoRA student's shared
frozen base shared (never duplicated, never written)."""

from __future__ import annotations

import pytest
import torch

from diffdistill.training.builders import build_experiment
from diffdistill.training.ema import EMA
from tests.helpers import TINY, compose_train


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    net[0].weight.requires_grad_(False)  # one frozen parameter: shared with the track, not averaged
    return net


def _perturb(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
        net[1].running_mean.add_(torch.randn(7, generator=g))


@pytest.mark.parametrize("warmup", [0, 3])
def test_fused_update_equals_the_loop_bit_for_bit(warmup):
    net = _mlp()
    fused, loop = EMA(net, 0.9, warmup_steps=warmup), EMA(net, 0.9, warmup_steps=warmup, fused=False)
    for k in range(5):
        _perturb(net, k)
        fused.update(net)
        loop.update(net)
    for a, b in zip(fused.module.state_dict().values(), loop.module.state_dict().values()):
        assert torch.equal(a, b)
    assert fused.num_updates == loop.num_updates == 5


def test_fused_update_is_the_ema_formula():
    """``theta_ema = beta^n theta_0 + (1 - beta) sum_k beta^(n-1-k) theta_k`` after n updates (no warm-up)."""
    net, beta = _mlp(), 0.8
    ema = EMA(net, beta)
    want = net[2].weight.detach().clone()
    for k in range(4):
        _perturb(net, 10 + k)
        ema.update(net)
        want = beta * want + (1 - beta) * net[2].weight.detach()
    torch.testing.assert_close(ema.module[2].weight, want)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)  # buffers are copied


def test_frozen_parameters_stay_shared_and_untouched():
    net = _mlp()
    ema = EMA(net, 0.5)
    frozen = net[0].weight
    before = frozen.detach().clone()
    _perturb(net, 0)
    ema.update(net)
    assert ema.module[0].weight is frozen and torch.equal(frozen, before)


def test_lora_student_track_shares_the_teacher_base_and_moves_only_adapters():
    """A shared-base LoRA student (tests/unit/test_lora.py): the track holds the base once (the teacher's tensors)
    and the fused update writes only the adapters."""
    exp = build_experiment(compose_train([*TINY, "objective=ect", "student.lora={rank:4,alpha:4}"]))
    gen = exp.roles["generator"]
    base = {n: p for n, p in gen.named_parameters() if not p.requires_grad}
    assert base and any(p.requires_grad for p in gen.parameters())
    snapshot = {n: p.detach().clone() for n, p in base.items()}
    ema = EMA(gen, 0.5)
    track = dict(ema.module.named_parameters())
    for n, p in base.items():
        assert track[n] is p  # not duplicated
    adapters = {n: p for n, p in gen.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in adapters.items()}
    with torch.no_grad():
        for p in adapters.values():
            p.add_(1.0)
    ema.update(gen)
    for n, p in base.items():
        assert torch.equal(p, snapshot[n])  # the shared base was not written
    for n, p in adapters.items():
        assert track[n] is not p
        assert torch.equal(track[n], torch.lerp(start[n], p.detach(), 0.5))  # what the per-parameter loop computes
