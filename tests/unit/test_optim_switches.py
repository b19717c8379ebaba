"""Memory and speed switches of the trainer (diffdistill/training/switches.py): activation checkpointing gives the
same gradients and the same training trajectory; per-role lists are checked against the run's roles."""

from __future__ import annotations

import pytest
import torch
from diffusers import ModelMixin

from diffdistill.models.backbones import MLPBackbone, UNetBackbone
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.denoiser import EDMDenoiser
from diffdistill.objectives import OBJECTIVES
from diffdistill.training.builders import build_trainer
from diffdistill.training.switches import enable_activation_checkpointing, set_tf32, switch_roles
from diffdistill.training.trainer import TrainerConfig
from tests.helpers import TINY, compose_train, tiny_unet2d_config


def _grads(den: torch.nn.Module, x: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
    den.zero_grad(set_to_none=True)
    sigma = torch.linspace(0.1, 20.0, x.shape[0])
    (den(x, sigma, cond) - x).square().mean().backward()
    return [p.grad.clone() for p in den.parameters()]


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_checkpointing_gives_identical_gradients(backbone):
    torch.manual_seed(0)
    if backbone == "mlp":
        den = EDMDenoiser(MLPBackbone(dim=6, hidden=32, depth=3, num_classes=4))
        x = torch.randn(5, 6)
    else:
        den = EDMDenoiser(UNetBackbone(tiny_unet2d_config(in_channels=1, out_channels=1), num_classes=4))
        x = torch.randn(5, 1, 8, 8)
    cond = Conditioning(class_labels=torch.arange(5) % 4)
    plain = _grads(den, x, cond)
    assert enable_activation_checkpointing(den) == 1
    checkpointed = _grads(den, x, cond)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_checkpointing_saves_activation_memory_of_the_mlp():
    """Fewer tensors are kept for the backward pass (the blocks' inner activations are recomputed)."""
    torch.manual_seed(0)
    den = EDMDenoiser(MLPBackbone(dim=6, hidden=64, depth=6))
    x = torch.randn(16, 6)

    def saved() -> int:
        n = 0

        def pack(t):
            nonlocal n
            n += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            den(x, torch.ones(16)).square().sum()
        return n

    before = saved()
    enable_activation_checkpointing(den)
    assert saved() < 0.6 * before


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_checkpointing_keeps_each_objectives_trajectory(name, tmp_path):
    """Three iterations with ``trainer.gradient_checkpointing=true`` reach the same weights as without."""
    weights = []
    for on in (False, True):
        over = [*TINY, f"objective={name}", f"run_dir={tmp_path / str(on)}", "trainer.max_steps=3"]
        over += ["trainer.sample_every=0", "trainer.checkpoint_every=0", "optim.lr=1e-3", "optim.warmup_steps=0"]
        over += [f"trainer.gradient_checkpointing={str(on).lower()}"]
        cfg = compose_train(over)
        if cfg.objective.get("distance") == "lpips":
            cfg.objective.distance = "l2"
        trainer = build_trainer(cfg)
        unets = [m for r in trainer.objective.roles for m in trainer.roles[r].modules() if isinstance(m, ModelMixin)]
        assert unets and all(u.is_gradient_checkpointing is on for u in unets)
        for _ in range(3):
            trainer.train_step()
        roles = trainer.objective.roles
        weights.append({f"{r}.{k}": v.clone() for r in roles for k, v in trainer.roles[r].state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7, msg=k)


def test_switch_lists_name_roles_the_run_builds(tmp_path):
    cfg = compose_train([*TINY, "objective=dmd", f"run_dir={tmp_path}", "trainer.gradient_checkpointing=[critic]"])
    with pytest.raises(ValueError, match=r"trainer\.gradient_checkpointing names role 'critic'"):
        build_trainer(cfg)
    assert switch_roles("k", True, ("generator", "fake_score"), ()) == ["generator", "fake_score"]
    assert switch_roles("k", ["teacher", "teacher"], ("generator",), ("generator", "teacher")) == ["teacher"]


def test_checkpointing_a_role_without_a_network_that_supports_it_says_so(tmp_path):
    """The toy's analytic affine student has no blocks to recompute."""
    cfg = compose_train(["experiment=toy/dmd", f"run_dir={tmp_path}", "trainer.gradient_checkpointing=[generator]"])
    with pytest.raises(ValueError, match=r"trainer\.gradient_checkpointing: role 'generator'"):
        build_trainer(cfg)


@pytest.mark.parametrize("value", ["abc", 3, [1, 2], {"a": 1}])
def test_bad_switch_values_name_the_key(value):
    with pytest.raises(ValueError, match=r"trainer\.channels_last"):
        TrainerConfig(channels_last=value, device="cpu")


def test_channels_last_per_role(tmp_path):
    cfg = compose_train([*TINY, "objective=dmd", f"run_dir={tmp_path}", "trainer.channels_last=[generator]"])
    trainer = build_trainer(cfg)

    def nhwc(module) -> bool:
        w = next(p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    assert nhwc(trainer.roles["generator"]) and not nhwc(trainer.roles["fake_score"])


def test_tf32_is_not_applicable_on_cpu():
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    assert set_tf32(True, torch.device("cpu")).startswith("not applicable")
    assert getattr(matmul, "fp32_precision", None) == before  # nothing process-wide was changed


@pytest.mark.gpu
def test_tf32_switch_sets_the_cuda_matmul_precision():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        assert set_tf32(True, torch.device("cuda")) == "tf32"
        a = torch.randn(512, 512, device="cuda")
        exact = (a.double() @ a.double()).float()
        err_tf32 = (a @ a - exact).abs().max()
        set_tf32(False, torch.device("cuda"))
        err_fp32 = (a @ a - exact).abs().max()
        assert err_tf32 > 10 * err_fp32  # TF32 keeps 10 mantissa bits
    finally:
        set_tf32(False, torch.device("cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_compile_per_role_traces_every_objective(name, tmp_path, monkeypatch):
    """``trainer.compile=true`` with every objective: dynamo captures each trainable denoiser (the ``eager`` backend
    here, inductor's code generation takes minutes on CPU), the state-dict keys stay, and two iterations reach
    the eager run's weights."""
    import torch._dynamo

    orig = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: orig(self, backend="eager", **kw))
    weights = []
    for value in ("false", "true"):
        torch._dynamo.reset()
        over = [*TINY, f"objective={name}", f"run_dir={tmp_path / value}", "trainer.max_steps=2"]
        over += ["trainer.sample_every=0", "trainer.checkpoint_every=0", f"trainer.compile={value}"]
        cfg = compose_train(over)
        if cfg.objective.get("distance") == "lpips":
            cfg.objective.distance = "l2"
        trainer = build_trainer(cfg)
        for _ in range(2):
            trainer.train_step()
        roles = trainer.objective.roles
        weights.append({f"{r}.{k}": v.clone() for r in roles for k, v in trainer.roles[r].state_dict().items()})
    assert weights[0].keys() == weights[1].keys()  # no `_orig_mod.` prefixes: checkpoints of both runs are alike
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6, msg=k)
