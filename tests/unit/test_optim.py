"""``OptimizerSpec``: any optimiser by name or Hydra ``_target_``, per-role settings, diffusers LR schedules."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffdistill.objectives.base import UpdateSchedule
from diffdistill.training.optim import OptimizerSpec, count_generator_updates
from tests.helpers import TINY, compose_train


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _lrs(spec: OptimizerSpec, n: int, num_updates: int | None = None) -> list[float]:
    """The learning rate each of the first ``n`` updates runs at."""
    opt, sched = spec.build("generator", _net(), num_updates)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("radam", torch.optim.RAdam)]
)
def test_builtin_names_build_their_torch_class_with_the_given_hyperparameters(name, cls):
    spec = OptimizerSpec(name=name, lr=3e-4, betas=(0.5, 0.9), weight_decay=0.1, eps=1e-6, warmup_steps=0)
    opt, _ = spec.build("generator", _net())
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (3e-4, (0.5, 0.9), 0.1, 1e-6)


def test_per_role_lr_and_betas_override_the_defaults():
    """DMD2 trains the fake score at its own rate; SiD uses beta1 = 0 (Zhou et al. 2024, arXiv:2404.04057)."""
    spec = OptimizerSpec(
        name="adam",
        lr=1e-5,
        betas=(0.9, 0.999),
        lr_per_role={"fake_score": 4e-5},
        betas_per_role={"generator": (0.0, 0.999)},
        warmup_steps=0,
    )
    gen = spec.build("generator", _net())[0].param_groups[0]
    fake = spec.build("fake_score", _net())[0].param_groups[0]
    assert (gen["lr"], gen["betas"]) == (1e-5, (0.0, 0.999))
    assert (fake["lr"], fake["betas"]) == (4e-5, (0.9, 0.999))


def test_unset_hyperparameters_are_the_optimisers_own_defaults():
    """``OptimizerSpec()`` is torch's AdamW with its defaults (wd 0.01, betas (0.9, 0.999), eps 1e-8), as before."""
    g = OptimizerSpec().build("generator", _net())[0].param_groups[0]
    ref = torch.optim.AdamW(_net().parameters()).defaults
    assert (g["betas"], g["weight_decay"], g["eps"]) == (ref["betas"], ref["weight_decay"], ref["eps"])


def test_any_torch_optimiser_by_hydra_target_and_partial():
    cfg = compose_train([*TINY, "optim=torch", "optim.lr=0.05", "+optim.lr_per_role.fake_score=0.01"])
    spec = instantiate(cfg.optim)
    opt, _ = spec.build("generator", _net())
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["lr"] == 0.05
    assert spec.build("fake_score", _net())[0].param_groups[0]["lr"] == 0.01
    # the optimiser really is the one configured: one SGD-with-momentum step by hand gives the same weights
    net = _net()
    opt = spec.optimizer(net.parameters(), lr=0.05)
    x = torch.randn(5, 3)
    w0 = net[0].weight.detach().clone()
    net(x).square().sum().backward()
    grad = net[0].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[0].weight.detach(), w0 - 0.05 * grad)


def test_a_hyperparameter_the_optimiser_does_not_take_names_the_key():
    spec = OptimizerSpec(name=None, optimizer=torch.optim.SGD, betas=(0.9, 0.99), warmup_steps=0)
    with pytest.raises(ValueError, match=r"optim\.betas.*SGD.*optim\.betas=null"):
        spec.build("generator", _net())


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"name": "sgd"}, "optim.name"),
        ({"name": "adamw", "optimizer": torch.optim.SGD}, "optim.name"),
        ({"name": None}, "optim.name"),
        ({"lr": 0.0}, "optim.lr"),
        ({"betas": (1.0, 0.9)}, "optim.betas"),
        ({"betas_per_role": {"generator": (0.9,)}}, "optim.betas_per_role.generator"),
        ({"schedule": "cosine_annealing"}, "optim.schedule.name"),
        ({"schedule": {"name": "cosine", "power": 2.0}}, "optim.schedule.power"),
        ({"schedule": "constant", "warmup_steps": 10}, "optim.warmup_steps"),
        ({"warmup_steps": 1.5}, "optim.warmup_steps"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        OptimizerSpec(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,package", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_optional_optimisers_say_which_package_to_install(name, package, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    spec = OptimizerSpec(name=name, lr=1.0, warmup_steps=0)  # configs compose without the package
    with pytest.raises(ValueError, match=rf"optim\.name={name}.*pip install {package}"):
        spec.build("generator", _net())


def test_prodigy_builds_when_installed():
    pytest.importorskip("prodigyopt")
    opt, _ = OptimizerSpec(name="prodigy", lr=1.0, betas=(0.9, 0.99), warmup_steps=0).build("generator", _net())
    assert type(opt).__name__ == "Prodigy" and opt.param_groups[0]["betas"] == (0.9, 0.99)


@pytest.mark.gpu
def test_adamw8bit_builds_and_steps_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    net = torch.nn.Linear(64, 128).cuda()
    opt, _ = OptimizerSpec(name="adamw8bit", lr=1e-3, warmup_steps=0).build("generator", net)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    w0 = net.weight.detach().clone()
    net(torch.randn(8, 64, device="cuda")).square().sum().backward()
    opt.step()
    assert not torch.equal(w0, net.weight)


def test_constant_with_warmup_ramps_linearly_from_zero():
    """diffusers' ``get_scheduler('constant_with_warmup')``: lr_k = lr min(1, k / W) (DMD2: W = 500)."""
    lr, w = 1e-3, 4
    got = _lrs(OptimizerSpec(lr=lr, warmup_steps=w), 8)
    assert got == pytest.approx([lr * min(1.0, k / w) for k in range(8)])


def test_constant_schedule_and_zero_warmup_keep_the_rate():
    assert _lrs(OptimizerSpec(lr=1e-3, warmup_steps=0, schedule="constant"), 3) == [1e-3] * 3
    assert _lrs(OptimizerSpec(lr=1e-3, warmup_steps=0), 3) == [1e-3] * 3


def test_cosine_matches_its_closed_form():
    """Warm-up W, then ``lr (1 + cos(pi (k - W) / (T - W))) / 2`` down to 0 at update T."""
    lr, w, total = 1e-2, 3, 13
    got = _lrs(OptimizerSpec(lr=lr, warmup_steps=w, schedule="cosine"), total + 1, total)
    want = [lr * k / w if k < w else lr * 0.5 * (1 + math.cos(math.pi * (k - w) / (total - w))) for k in range(total)]
    assert got[:total] == pytest.approx(want) and got[total] == pytest.approx(0.0, abs=1e-12)


def test_linear_decays_to_zero():
    lr, w, total = 1e-2, 2, 10
    got = _lrs(OptimizerSpec(lr=lr, warmup_steps=w, schedule={"name": "linear"}), total, total)
    want = [lr * k / w if k < w else lr * (total - k) / (total - w) for k in range(total)]
    assert got == pytest.approx(want)


def test_decaying_schedules_need_room_after_the_warmup():
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerSpec(warmup_steps=10, schedule="cosine").build("generator", _net(), 10)


def test_generator_update_count_follows_the_update_schedule():
    """With TTUR 5 (DMD2) and a 3-iteration critic-only warm-up, closed form == counting iterations."""
    for sched in (UpdateSchedule(), UpdateSchedule(5), UpdateSchedule(5, 3), UpdateSchedule(2, 7)):
        for steps in (1, 4, 10, 23):
            want = sum(sched.is_generator_step(s) for s in range(steps))
            assert count_generator_updates(sched, steps) == want


def test_trainer_spans_a_cosine_over_each_roles_own_updates(tmp_path):
    """DMD with 5 critic updates per generator update over 10 iterations: the fake score's cosine ends at its 10th
    update, the generator's at its 2nd."""
    from diffdistill.training.builders import build_trainer

    cfg = compose_train(
        [
            *TINY,
            "objective=dmd",
            "objective.critic_steps_per_generator_step=5",
            "optim/schedule=cosine",
            "optim.warmup_steps=0",
            "trainer.max_steps=10",
            f"run_dir={tmp_path}",
        ]
    )
    trainer = build_trainer(cfg)
    for role, n in (("generator", 2), ("fake_score", 10)):
        sched = trainer.schedulers[role]
        assert sched.lr_lambdas[0](n) == pytest.approx(0.0, abs=1e-12)
        assert sched.lr_lambdas[0](n // 2) == pytest.approx(0.5)


def test_old_run_config_without_schedule_keys_still_builds():
    """An ``optim:`` block saved by diffdistill 0.1 (no ``schedule``/``optimizer`` keys) builds the same AdamW."""
    old = OmegaConf.create(
        {
            "_target_": "diffdistill.training.optim.OptimizerSpec",
            "name": "adamw",
            "lr": 2e-6,
            "betas": [0.9, 0.999],
            "weight_decay": 0.01,
            "eps": 1e-8,
            "warmup_steps": 500,
            "fused": False,
            "lr_per_role": {},
            "betas_per_role": {},
        }
    )
    spec = instantiate(old)
    opt, sched = spec.build("generator", _net())
    assert type(opt) is torch.optim.AdamW and spec.schedule_name == "constant_with_warmup"
    assert sched.lr_lambdas[0](250) == pytest.approx(0.5)


def test_old_scheduler_state_loads_into_the_new_schedule():
    """0.1 checkpoints hold a ``LambdaLR`` state; the diffusers schedule is a ``LambdaLR`` too."""
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(3):
        opt.step()
        old.step()
    new_opt, new = OptimizerSpec(lr=1e-3, warmup_steps=10).build("generator", net)
    new.load_state_dict(old.state_dict())
    assert new.last_epoch == 3


def test_fused_is_foreach_on_cpu():
    opt, _ = OptimizerSpec(fused=True, warmup_steps=0).build("generator", _net())
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0].get("fused")


def test_import_of_an_optional_package_is_lazy():
    """Choosing adamw never imports bitsandbytes or prodigyopt (checked in a fresh interpreter)."""
    code = (
        "import sys, torch; from diffdistill.training.optim import OptimizerSpec; "
        "OptimizerSpec(warmup_steps=0).build('generator', torch.nn.Linear(2, 2)); "
        "sys.exit(int(any(m in sys.modules for m in ('bitsandbytes', 'prodigyopt'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
