"""Every registered objective has a toy recipe (experiment=toy_gmm/<name>) that reaches the exact distribution.

The fast tests check that the recipes exist for the whole registry and compose with the exact teacher; the slow
ones (``-m slow``) train each recipe on the project's mixture (8 Gaussians on a circle, 2-D) with its fixed seed
and score the one-step EMA student against exact samples (benchmarks/bench_toy_quality.py runs the same recipes
on mixtures of other shapes and dimensions and records the curves in benchmarks/results/toy_quality.json).
"""

from __future__ import annotations

import pytest
import torch

from diffdistill.objectives.base import OBJECTIVES
from diffdistill.utils.paths import CONFIG_DIR
from tests.helpers import compose_train

NAMES = sorted(OBJECTIVES)

# the one-step bar of each recipe on the project's mixture (sliced W2 as a multiple of the exact-vs-exact floor,
# the largest error of a mode's mass): 2x and 0.02 where the recipe gets there; otherwise the measured bound
# of the best recipe found, with the reason in the recipe's header (and in benchmarks/results/toy_quality.json)
# (measured: benchmarks/bench_toy_quality.py, circle8, each recipe's own steps; the bar leaves ~15% for
# thread-count rounding)
BARS: dict[str, tuple[float, float]] = {
    # not at 2x in this budget (the reasons: experiment/toy_gmm/<name>.yaml headers)
    "ect": (2.4, 0.02),  # measured 2.10 / 0.009 (8 stages, huber_c 1, 30k steps)
    "add": (3.3, 0.03),  # measured 2.87 / 0.023 (15k steps)
    "ladd": (4.3, 0.04),  # measured 3.77 / 0.033 (15k steps)
    # SIM's mode masses drift as its modes sharpen (experiment/toy_gmm/sim.yaml header)
    "sim": (2.5, 0.027),  # measured 2.12 / 0.023 (sigma_init 1.0; 2.50 / 0.018 at SiD's 2.5)
}
# e.g. dmd 1.18 / 0.005, dmd2 1.17 / 0.005, fdistill 1.19, diff_instruct 1.18 (8,000 steps), ict 1.81 / 0.005,
# scm 1.08 / 0.008 (30,000 steps), rcm 1.43 / 0.008 (20,000 steps, a student step every 2),
# vsd 1.52 / 0.008 (8,000 steps, rank-128 LoRA, sigma_init 1.0), sid 1.43 / 0.013,
# sida 1.16 / 0.009 (8,000 steps, no normaliser)
DEFAULT_BAR = (2.0, 0.02)


@pytest.mark.parametrize("name", NAMES)
def test_every_objective_has_a_toy_recipe_with_the_exact_teacher(name):
    assert (CONFIG_DIR / "experiment" / "toy_gmm" / f"{name}.yaml").exists(), f"add experiment/toy_gmm/{name}.yaml"
    cfg = compose_train([f"experiment=toy_gmm/{name}"])
    assert cfg.objective._target_.rsplit(".", 1)[1] == OBJECTIVES[name].__name__
    assert cfg.backbone._target_ == "diffdistill.training.builders.analytic_teacher"
    assert cfg.data._target_ == "diffdistill.data.GaussianMixtureToy"


@pytest.mark.parametrize(
    ("name", "key", "fraction"),
    [("scm", "tangent_warmup_steps", 0.1), ("rcm", "tangent_warmup_steps", 0.1), ("ect", "double_every", 0.125)],
)
def test_recipe_schedules_stated_as_a_share_of_the_run_follow_max_steps(name, key, fraction):
    """A warm-up or stage length that the recipe states as a share of training scales with ``trainer.max_steps``."""
    from diffdistill.utils.resolvers import steps_fraction

    default = compose_train([f"experiment=toy_gmm/{name}"])
    assert default.objective[key] == round(fraction * default.trainer.max_steps)
    assert compose_train([f"experiment=toy_gmm/{name}", "trainer.max_steps=5001"]).objective[key] == round(
        fraction * 5001
    )
    assert steps_fraction(3, 0.1) == 1  # never 0 steps
    with pytest.raises(ValueError, match="fraction"):
        steps_fraction(100, 1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_toy_recipe_reaches_the_exact_distribution(name, tmp_path):
    from omegaconf import open_dict

    from diffdistill.evaluation.toy import evaluate_toy, toy_reference
    from diffdistill.training.builders import build_trainer

    torch.set_num_threads(1)
    cfg = compose_train([f"experiment=toy_gmm/{name}", "trainer.device=cpu", f"run_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.logger, cfg.trainer.sample_every, cfg.trainer.checkpoint_every = None, 0, 0
    trainer = build_trainer(cfg)
    trainer.fit()
    gen = trainer.ema_generator().eval()
    heun = trainer.objective.student_sampler == "heun"  # objective=edm trains a denoiser: sampled like a teacher
    model, kw = (gen.denoiser, {"sampler_steps": 18}) if heun else (gen, {})
    ref = toy_reference(trainer.dataset, 20000, assignment="posterior")  # the exact sets and their floor, once
    r = evaluate_toy(model, trainer.dataset, 20000, assignment="posterior", reference=ref, **kw)
    sw2_bar, mass_bar = BARS.get(name, DEFAULT_BAR)
    ratio = r.scores["sw2"] / ref.floor["sw2"]
    assert ratio <= sw2_bar and r.scores["mass_error_max"] <= mass_bar, (ratio, r.scores)
