"""SD-family students export as stock StableDiffusion(XL)Pipeline folders with LCMScheduler and the recipe's
timesteps, and reproduce diffdistill's own ``Generator.sample`` (fp32) on the same prompts and seeds; LoRA students
export fused, or as the base network plus a folder ``pipe.load_lora_weights`` reads.

Seeding convention of both sides: ``g = torch.Generator().manual_seed(s)``; unit latents ``randn((B, 4, 8, 8), g)``
first, then one noise draw per further step (the scheduler's ``randn_tensor``, diffdistill's multistep sampler).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from diffdistill.export import export, export_pipeline
from diffdistill.export.sd import lcm_default_timesteps, original_steps_for, recipe_timesteps
from diffdistill.models.adapters.sd import sd_teacher
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.consistency import ConsistencyDenoiser
from diffdistill.models.generator import Generator
from diffdistill.models.io import model_config, save_model
from diffdistill.models.lora import add_lora
from diffdistill.objectives.lcm import LCM
from diffdistill.testing.tiny_t2i import tiny_sd_pipeline
from tests.helpers import perturb

PROMPTS = ["lowest newer", "wider lower"]


def assert_same(got, want):
    """fp32 agreement: within 1e-5, or 1e-6 of the sample's largest value (~8 float32 ulps) when that is larger. A
    random UNet's x0 at t = 999 reaches ~60 (the EDM view divides x_vp by alpha = 0.068, so both sides round at that
    scale); a trained student's is O(1), where this is 1e-5."""
    torch.testing.assert_close(got, want, atol=max(1e-5, 1e-6 * float(want.abs().max())), rtol=0)


PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_bases")
    return {kind: tiny_sd_pipeline(root / kind, kind=kind) for kind in ("sd", "sdxl")}


@pytest.fixture(scope="module")
def teachers(bases):
    return {kind: sd_teacher(path, guidance_scale=3.0) for kind, path in bases.items()}


def _sigmas(teacher, timesteps) -> list[float]:
    return [float(teacher.denoiser.schedule.t_to_sigma(torch.tensor([t]))) for t in timesteps]


def _student(teacher, timesteps, seed, lcm=False, embed=False, lora=False) -> Generator:
    den = copy.deepcopy(teacher.denoiser).requires_grad_(True)
    if lora:
        add_lora(den, rank=2)
    sigmas = _sigmas(teacher, timesteps)
    gen = Generator(den, sigmas[0], sigmas)
    if lcm:
        LCM.prepare_student(gen, teacher=teacher, embed_guidance=embed)
    return perturb(gen, seed, "lora_" if lora else "")


def _reference(gen: Generator, teacher, kind: str, steps: int, seed: int = 0, w: float | None = None):
    """diffdistill's sampler on diffdistill's own prompt encoding (the teacher's PromptEncoder)."""
    enc = teacher.prompt_encoder.encode(PROMPTS)
    cond = Conditioning(
        prompt_embeds=enc.prompt_embeds,
        pooled_prompt_embeds=enc.pooled_prompt_embeds if kind == "sdxl" else None,
        guidance_scale=None if w is None else torch.full((len(PROMPTS),), w),
    )
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((len(PROMPTS), *gen.sample_shape), generator=g)
    with torch.no_grad():
        return gen.sample(z, cond, gen.sampling_sigmas[:steps], generator=g)


def _stock(pipe, seed: int = 0, **kw):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images


@pytest.mark.parametrize(
    "kind,student",
    [
        ("sd", "dmd_one_step"),  # a plain SD student (DMD's), one step at t = 999
        ("sd", "lcm_guided_two_step"),  # LCM boundary + guidance embedding, timesteps [999, 499]
        ("sdxl", "lcm_guided_two_step"),
    ],
)
def test_sd_student_exports_to_stock_pipeline(tmp_path, bases, teachers, kind, student):
    teacher = teachers[kind]
    if student == "dmd_one_step":
        gen, timesteps, w = _student(teacher, [999], 1), [999], None
    else:
        gen, timesteps = _student(teacher, [999, 499], 2, lcm=True, embed=True), [999, 499]
        w = gen.guidance["w_default"]
    # the base pipeline comes from the recorded teacher path (no base= argument)
    res = export_pipeline(gen, tmp_path / "out", metadata={"teacher": str(bases[kind]), "objective": "x"})
    assert res.pipeline_class == PIPELINES[kind].__name__ and res.verified["recipe"] < 1e-3
    pipe = PIPELINES[kind].from_pretrained(str(tmp_path / "out"))
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert (pipe.unet.config.time_cond_proj_dim is not None) == (w is not None)
    meta = json.loads((tmp_path / "out" / "diffdistill.json").read_text())
    assert meta["recipe"]["timesteps"] == timesteps and meta["base"] == str(bases[kind])
    assert f"timesteps={timesteps}" in (tmp_path / "out" / "README.md").read_text()
    call = {"guidance_scale": w if w is not None else 1.0}
    for n in range(1, len(timesteps) + 1):
        want = _reference(gen, teacher, kind, n, seed=5, w=w)
        assert_same(_stock(pipe, seed=5, timesteps=timesteps[:n], **call), want)
    # the scheduler's original_inference_steps makes the default schedule the recipe's
    got = _stock(pipe, seed=5, num_inference_steps=len(timesteps), **call)
    assert_same(got, _reference(gen, teacher, kind, len(timesteps), seed=5, w=w))


@pytest.mark.parametrize("kind,mode", [("sd", "fuse"), ("sd", "adapters"), ("sdxl", "adapters")])
def test_sd_lora_student(tmp_path, bases, teachers, kind, mode):
    """A LoRA LCM student (no guidance embedding, as LCM-LoRA): fused into the UNet, or written as a diffusers LoRA
    that the *teacher's* pipeline loads with ``load_lora_weights`` and then reproduces the student."""
    teacher = teachers[kind]
    gen = _student(teacher, [999, 499], 3, lcm=True, lora=True)
    # through a saved model folder: its config alone rebuilds the UNet, the LCM boundary and the adapters
    save_model(gen, model_config(gen), tmp_path / "student", extra={"teacher": str(bases[kind])})
    res = export(tmp_path / "student", tmp_path / "out", lora=mode)
    assert res.verified["recipe"] < 1e-3
    want = _reference(gen, teacher, kind, 2)
    if mode == "fuse":
        pipe = PIPELINES[kind].from_pretrained(str(tmp_path / "out"))
        assert not (tmp_path / "out" / "lora").exists()
    else:
        weights = tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors"
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
        pipe = PIPELINES[kind].from_pretrained(str(bases[kind]))  # the teacher pipeline itself
        pipe.scheduler = LCMScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
        pipe.load_lora_weights(str(tmp_path / "out"), subfolder="lora")
    assert_same(_stock(pipe, timesteps=[999, 499], guidance_scale=1.0), want)


def test_sd_export_errors(tmp_path, bases, teachers):
    teacher = teachers["sd"]
    gen = _student(teacher, [999], 4)
    with pytest.raises(ValueError, match="base=<teacher pipeline folder>"):
        export_pipeline(gen, tmp_path / "a")
    with pytest.raises(ValueError, match="takes no prompts"):
        export_pipeline(gen, tmp_path / "b", base=str(bases["sd"]), pipeline="diffdistill")
    off = Generator(gen.denoiser, 10.0, [10.0])
    with pytest.raises(ValueError, match="fractional timesteps"):
        export_pipeline(off, tmp_path / "c", base=str(bases["sd"]))
    song = Generator(ConsistencyDenoiser(gen.denoiser, 0.03), gen.sigma_init, gen.sampling_sigmas)
    with pytest.raises(ValueError, match="Song et al."):
        export_pipeline(song, tmp_path / "d", base=str(bases["sd"]))
    assert not any(tmp_path.iterdir())  # nothing written


def test_recipe_timesteps_and_lcm_defaults(teachers):
    sched = teachers["sd"].denoiser.schedule
    assert recipe_timesteps(sched, _sigmas(teachers["sd"], [999, 749, 499, 249])) == [999, 749, 499, 249]
    # diffusers' own default schedules (scheduling_lcm.py set_timesteps)
    s = LCMScheduler()
    for n in (1, 2, 4):
        s.set_timesteps(num_inference_steps=n)
        assert lcm_default_timesteps(1000, 50, n) == s.timesteps.tolist()
    m = original_steps_for([999, 749, 499, 249], 1000)
    s = LCMScheduler(original_inference_steps=m)
    s.set_timesteps(num_inference_steps=4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]


def test_sd_student_exports_tcd(tmp_path, bases, teachers):
    """With a TCD gamma the export is TCDScheduler (``eta = gamma``), which reproduces TCD's timestep rule applied to
    the student (:func:`~diffdistill.export.sd.tcd_scheduler_sample`)."""
    from diffusers import TCDScheduler

    from diffdistill.export.sd import tcd_scheduler_sample

    teacher = teachers["sd"]
    gen = _student(teacher, [999, 749, 499], 6, lcm=True)
    res = export_pipeline(gen, tmp_path / "out", base=str(bases["sd"]), gamma=0.3)
    assert res.call == {"timesteps": [999, 749, 499], "guidance_scale": 1.0, "eta": 0.3}
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert isinstance(pipe.scheduler, TCDScheduler)
    enc = teacher.prompt_encoder.encode(PROMPTS)
    g = torch.Generator().manual_seed(7)
    z = torch.randn((len(PROMPTS), *gen.sample_shape), generator=g)
    with torch.no_grad():
        want = tcd_scheduler_sample(gen, z, Conditioning(prompt_embeds=enc.prompt_embeds), [999, 749, 499], 0.3, g)
    assert_same(_stock(pipe, seed=7, **res.call), want)


def test_sigma_input_student_exports_with_scaled_latents(tmp_path):
    """A student fed ``sigma_init z`` (``input_noise="sigma"``, SiD-LSG) is reproduced by the stock pipeline called
    with ``latents = sqrt(1 - abar_t0) z``; the plan records that scale (the card shows the call)."""
    import copy

    from diffdistill.export.exporter import export_pipeline
    from diffdistill.models import Generator
    from diffdistill.models.adapters.sd import sd_teacher
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "sd", kind="sd")
    den = copy.deepcopy(sd_teacher(base).denoiser).requires_grad_(True)
    sig = [float(den.schedule.sigmas[t]) for t in (625, 249)]
    gen = Generator(den, sig[0], sig, input_noise="sigma")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    res = export_pipeline(gen, tmp_path / "out", metadata={"teacher": str(base), "objective": "sid"})
    assert max(res.verified.values()) < 1e-4
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"latents = {math.sqrt(1 - 1 / (1 + sig[0] ** 2)):.8g} * torch.randn((1, 4, 8, 8)" in card
