"""Every paper recipe of the text-to-image backbones (``experiment=sd15/*``, ``sdxl/*``, ``sd3/*``) composes with
only the paths its header asks for, and trains two steps on a tiny offline pipeline of its backbone kind with the
heavy knobs (batch, steps, LoRA rank, synthetic-set size) shrunk; the recipe's own objective settings are kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffdistill.cli.common import CONFIG_DIR
from diffdistill.training.builders import build_trainer
from tests.helpers import compose_train

EXPERIMENTS = Path(CONFIG_DIR) / "experiment"
FAMILIES = {"sd15": "sd", "sdxl": "sdxl", "sd3": "sd3"}
RECIPES = sorted(
    f"{family}/{p.stem}" for family in FAMILIES for p in (EXPERIMENTS / family).glob("*.yaml") if p.stem[0] != "_"
)
PROMPTS = ["a red cube", "blue sky", "a dog", "a cat"]
# SD's scaled_linear DDPM schedule (beta 0.00085..0.012, T = 1000) in the EDM view: sigma_t at the recipes' timesteps
# (DMD2 / ADD 999, 749, 499, 249; LCMScheduler's 4 steps 999, 759, 499, 259; SiD-LSG's t_init 625)
SD_SIGMAS = {999: 14.614641, 759: 4.260557, 749: 4.081729, 625: 2.501704, 499: 1.612886, 259: 0.71938, 249: 0.693205}


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """Tiny SD / SDXL / SD3 pipelines (16 px images), a prompt file, a COCO captions file and, per kind, a latents
    file of captioned images encoded by that pipeline's VAE."""
    import json

    from diffdistill.data import CaptionedImages, SyntheticImages, encode_latents
    from diffdistill.models.latent import LatentCodec
    from diffdistill.testing.tiny_flow import tiny_sd3_pipeline
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd_recipes")
    pipes = {
        "sd": tiny_sd_pipeline(root / "sd", kind="sd", image_size=16),
        "sdxl": tiny_sd_pipeline(root / "sdxl", kind="sdxl", image_size=16),
        "sd3": tiny_sd3_pipeline(root / "sd3", image_size=16),
    }
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    coco = {"annotations": [{"image_id": i, "id": i, "caption": p} for i, p in enumerate(PROMPTS)]}
    (root / "captions.json").write_text(json.dumps(coco))
    words = tuple(f"shape {k}" for k in range(10))
    images = CaptionedImages(SyntheticImages(num=8, resolution=16, channels=3), "a photo of a {}", words=words)
    latents = {
        kind: encode_latents(images, LatentCodec.from_pretrained(pipe), root / f"latents_{kind}.safetensors")
        for kind, pipe in pipes.items()
    }
    return {"pipes": pipes, "prompts": root / "prompts.txt", "coco": root / "captions.json", "latents": latents}


def _data_path(t2i, target: str, kind: str) -> str:
    if target.endswith("PromptFile"):
        return str(t2i["prompts"])
    if target.endswith("CocoCaptions"):
        return str(t2i["coco"])
    if target.endswith("LatentDataset"):
        return str(t2i["latents"][kind])
    raise AssertionError(f"no tiny stand-in for data target {target}")


def _compose(t2i, recipe: str, run_dir: Path, tiny: bool = True):
    kind = FAMILIES[recipe.split("/")[0]]
    base = compose_train([f"experiment={recipe}"])
    over = [f"experiment={recipe}", f"backbone.path={t2i['pipes'][kind]}"]
    over.append(f"data.path={_data_path(t2i, base.data._target_, kind)}")
    over.append(f"run_dir={run_dir}")
    if tiny:
        over += [
            "trainer.device=cpu",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.gradient_accumulation_steps=1",
            "trainer.gradient_checkpointing=false",
            "trainer.log_every=1",
            "trainer.sample_every=0",
            "trainer.checkpoint_every=2",
            "trainer.eval_every=0",
            "trainer.num_grid_samples=2",
            "trainer.teacher_sample_steps=2",
            "optim.warmup_steps=0",
        ]
        if base.student.get("lora"):
            over += ["student.lora.rank=2", "student.lora.alpha=2"]
        for key, value in (("synthetic_samples", 4), ("synthetic_steps", 2), ("regression_pairs", 4)):
            if key in base.objective:
                over.append(f"objective.{key}={value}")
    return compose_train(over)


def test_recipes_are_enumerated():
    assert {r.split("/")[0] for r in RECIPES} == set(FAMILIES), RECIPES
    assert {"sd15/dmd2", "sd15/dmd2_4step", "sdxl/dmd2", "sd15/lcm", "sdxl/lcm_lora", "sd15/sid_lsg"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header_and_paths(tmp_path, t2i, recipe):
    """A recipe is a global-package file that cites its paper, names the paths it needs, and after those two
    overrides leaves no mandatory value unset; its student sigmas lie in the teacher's noise range."""
    text = (EXPERIMENTS / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", text), f"{recipe}: the header cites no arXiv id"
    assert "backbone.path" in text and "data.path" in text, f"{recipe}: the header names the paths it needs"
    cfg = _compose(t2i, recipe, tmp_path, tiny=False)
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    assert cfg.backbone._target_.endswith("sd3_teacher" if recipe.startswith("sd3/") else ".sd_teacher")
    assert cfg.get("schedule") is None  # grids over the teacher's own noise range, not EDM's 0.002..80
    if not recipe.startswith("sd3/"):  # every student sigma is one of the teacher's integer DDPM timesteps
        from diffdistill.schedules.discrete import DDPMSchedule

        sigmas = list(cfg.student.sampling_sigmas or []) + [cfg.student.sigma_init or SD_SIGMAS[999]]
        t = DDPMSchedule.scaled_linear().sigma_to_t(torch.tensor(sigmas))
        assert torch.allclose(t, t.round(), atol=1e-3) and set(t.round().int().tolist()) <= set(SD_SIGMAS), t


def test_sd_sigmas_are_the_ddpm_timesteps():
    """The sigmas written into the recipes are SD's DDPM timesteps 999/749/499/249 (and SiD-LSG's t_init 625)."""
    from diffdistill.schedules.discrete import DDPMSchedule

    schedule = DDPMSchedule.scaled_linear()
    for t, sigma in SD_SIGMAS.items():
        assert float(schedule.sigmas[t]) == pytest.approx(sigma, abs=1e-5)
        assert float(schedule.sigma_to_t(torch.tensor([sigma]))) == pytest.approx(t, abs=1e-3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_on_a_tiny_pipeline(tmp_path, t2i, recipe):
    trainer = build_trainer(_compose(t2i, recipe, tmp_path))
    last = trainer.fit()
    assert trainer.step == 2
    losses = {k: v for k, v in last.items() if k.endswith("_loss")}
    assert losses and all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in losses.values()), last
    assert (tmp_path / "checkpoints" / "step0000002").is_dir()
    if trainer.run_config.get("export_pipeline"):  # as diffdistill-train does after fit: a stock diffusers folder
        import json

        from diffdistill.export import export

        export(tmp_path, tmp_path / "pipeline", overwrite=True)
        scheduler = json.loads((tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "LCMScheduler", scheduler
