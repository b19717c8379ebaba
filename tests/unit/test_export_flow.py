"""Flow-matching (SD3) students export as stock StableDiffusion3Pipeline folders with
FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) and the recipe's ``sigmas=``, and reproduce diffdistill's
own ``Generator.sample`` (fp32) on the same prompts and seeds; LoRA students export fused, or as the base transformer
plus a folder ``pipe.load_lora_weights`` reads. Students the stock scheduler cannot express get one clear error.

Seeding convention of both sides: unit latents ``randn((B, 16, 8, 8), torch.Generator().manual_seed(s))``; the
re-noising of each further step from torch's global generator after ``torch.manual_seed(s + 1)`` (the pipeline calls
``scheduler.step`` without its generator; a different seed, or the first step's noise would repeat the latents).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open

from diffdistill.conventions import edm_to_rf
from diffdistill.export import export, export_pipeline
from diffdistill.export.flow import plan_flow
from diffdistill.models.adapters.sd3 import sd3_teacher
from diffdistill.models.consistency import ConsistencyDenoiser
from diffdistill.models.generator import Generator
from diffdistill.models.io import model_config, save_model
from diffdistill.models.lora import add_lora
from diffdistill.testing.tiny_flow import tiny_sd3_pipeline
from tests.helpers import perturb

PROMPTS = ["lowest newer", "wider lower"]
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}
ONE, TWO = [999.0], [999.0, 1.0]  # flow times u = 0.999 (the adapter's sigma_max) and 0.5


def assert_same(got, want, sigma0: float):
    """fp32 agreement: 1e-5, plus what the EDM view's own float32 rounding of the pipeline's start point costs. The
    adapter maps ``x = (1 + sigma) z`` back to ``x_rf = z`` through ``edm_to_rf``; computed as ``(1 - u) x`` at
    ``u = 0.999`` the subtraction cancels and leaves ``x_rf`` ~1.3e-5 off in relative terms (as ``x / (1 + sigma)``
    it is exact to an ulp), which reaches ``x0`` unchanged (``x0 = x_rf - u v``). The term is measured, not assumed."""
    s = torch.tensor([sigma0])
    rel = float((edm_to_rf(1 + s, s)[0] - 1).abs())
    torch.testing.assert_close(got, want, atol=1e-5 + 2 * rel * float(want.abs().max()), rtol=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3_base") / "pipe")


@pytest.fixture(scope="module")
def teacher(base):
    return sd3_teacher(base, guidance_scale=3.0)


def _student(teacher, sigmas, seed, lora=False) -> Generator:
    den = copy.deepcopy(teacher.denoiser).requires_grad_(True)
    if lora:
        add_lora(den, rank=2)
    return perturb(Generator(den, sigmas[0], sigmas), seed, "lora_" if lora else "")


def _reference(gen: Generator, teacher, steps: int, seed: int = 0):
    """diffdistill's sampler on diffdistill's own prompt encoding (the teacher's SD3PromptEncoder)."""
    cond = teacher.prompt_encoder.encode(PROMPTS)
    with torch.random.fork_rng(devices=[]):
        z = torch.randn((len(PROMPTS), *gen.sample_shape), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            return gen.sample(z, cond, gen.sampling_sigmas[:steps])


def _stock(pipe, seed: int = 0, global_seed: int | None = None, **kw):
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1 if global_seed is None else global_seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return pipe(PROMPTS, generator=g, output_type="latent", **kw).images


@pytest.mark.parametrize("sigmas", [ONE, TWO], ids=["one_step", "two_step"])
def test_flow_student_exports_to_stock_pipeline(tmp_path, base, teacher, sigmas):
    gen = _student(teacher, sigmas, 1)
    # the base pipeline comes from the recorded teacher path (no base= argument)
    res = export_pipeline(gen, tmp_path / "out", metadata={"teacher": str(base), "objective": "dmd"})
    assert res.pipeline_class == "StableDiffusion3Pipeline" and res.verified["recipe"] < 1e-3
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "out"), **NO_T5)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    assert pipe.scheduler.config.shift == 3.0  # the teacher's scheduler, re-noising switched on
    meta = json.loads((tmp_path / "out" / "diffdistill.json").read_text())
    recipe = meta["recipe"]
    assert recipe["sampling_sigmas"] == sigmas and meta["base"] == str(base)
    assert recipe["load_kwargs"] == NO_T5 and res.call == recipe["call"]
    assert pipe.scheduler.config._diffdistill_recipe["pipeline_sigmas"] == recipe["pipeline_sigmas"]
    # sigmas= are the flow times before SD3's shift s = 3 (sigma -> 3 sigma): u0 = (sigma / 3) / (1 + sigma / 3)
    want_u0 = [(s / 3) / (1 + s / 3) for s in sigmas]
    assert recipe["pipeline_sigmas"] == pytest.approx(want_u0, rel=1e-12)
    assert res.call == {"sigmas": recipe["pipeline_sigmas"], "guidance_scale": 1.0}
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"sigmas={recipe['pipeline_sigmas']}" in card and "text_encoder_3=None" in card
    for n in range(1, len(sigmas) + 1):
        got = _stock(pipe, seed=5, **res.call | {"sigmas": res.call["sigmas"][:n]})
        assert_same(got, _reference(gen, teacher, n, 5), sigmas[0])
    if len(sigmas) > 1:  # the second step's fresh noise is real: another global seed gives another sample
        other = _stock(pipe, seed=5, global_seed=7, **res.call)
        assert (other - _reference(gen, teacher, len(sigmas), 5)).abs().max() > 1e-2


def test_flow_scheduler_runs_the_recipe_flow_times(base, teacher):
    """The exported scheduler, handed the call's sigmas=, steps through u = sigma / (1 + sigma) (float32)."""
    gen = _student(teacher, [999.0, 3.0, 1.0, 1 / 3], 2)
    plan = plan_flow(gen, str(base))
    assert plan.pipeline_sigmas == pytest.approx(teacher.denoiser.pipeline_sigmas(gen.sampling_sigmas), rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler.from_config(teacher.denoiser.scheduler_config)
    sched.set_timesteps(sigmas=plan.pipeline_sigmas)
    torch.testing.assert_close(sched.sigmas[:-1], torch.tensor([0.999, 0.75, 0.5, 0.25]), atol=2e-7, rtol=0)


def test_flow_student_with_dynamic_shift(tmp_path):
    """A teacher whose scheduler shifts by resolution (``use_dynamic_shifting``, Flux-style ``mu``): the call passes
    the student's ``mu``, so its sigmas= land on the recipe's flow times."""
    folder = tiny_sd3_pipeline(tmp_path / "base")
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dynamic_shifting": True}))
    teacher = sd3_teacher(folder)
    gen = _student(teacher, TWO, 5)
    res = export_pipeline(gen, tmp_path / "out", base=str(folder))
    mu = teacher.denoiser.mu()
    assert res.call["mu"] == pytest.approx(mu) and res.verified["recipe"] < 1e-3
    s = teacher.denoiser.shift()
    assert res.call["sigmas"] == pytest.approx([(x / s) / (1 + x / s) for x in TWO], rel=1e-12)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "out"), **NO_T5)
    assert_same(_stock(pipe, **res.call), _reference(gen, teacher, 2), TWO[0])


@pytest.mark.parametrize("mode", ["fuse", "adapters"])
def test_flow_lora_student(tmp_path, base, teacher, mode):
    """A LoRA flow student: fused into the transformer, or written as a diffusers LoRA that the *teacher's* pipeline
    loads with ``load_lora_weights`` and then reproduces the student."""
    gen = _student(teacher, TWO, 3, lora=True)
    # through a saved model folder: its config alone rebuilds the transformer and the adapters
    save_model(gen, model_config(gen), tmp_path / "student", extra={"teacher": str(base)})
    res = export(tmp_path / "student", tmp_path / "out", lora=mode)
    assert res.verified["recipe"] < 1e-3
    want = _reference(gen, teacher, 2)
    if mode == "fuse":
        pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "out"), **NO_T5)
        assert not (tmp_path / "out" / "lora").exists()
        assert not any("lora" in k for k in pipe.transformer.state_dict())
    else:
        weights = tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors"
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(base), **NO_T5)  # the teacher pipeline itself
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
        pipe.load_lora_weights(str(tmp_path / "out"), subfolder="lora")
        assert 'subfolder="lora"' in (tmp_path / "out" / "README.md").read_text()
    assert_same(_stock(pipe, **res.call), want, TWO[0])


def test_flow_export_errors(tmp_path, base, teacher):
    gen = _student(teacher, TWO, 4)
    with pytest.raises(ValueError, match=r"exports into its teacher.s pipeline.*base=<teacher pipeline folder>"):
        export_pipeline(gen, tmp_path / "a")
    with pytest.raises(ValueError, match="takes no prompts"):
        export_pipeline(gen, tmp_path / "b", base=str(base), pipeline="diffdistill")
    song = Generator(ConsistencyDenoiser(gen.denoiser, 0.002), gen.sigma_init, gen.sampling_sigmas)
    with pytest.raises(ValueError, match=r"Song et al.*boundary_condition=false.*dmd"):
        export_pipeline(song, tmp_path / "c", base=str(base))
    with pytest.raises(ValueError, match="TCD gamma"):
        export_pipeline(gen, tmp_path / "d", base=str(base), gamma=0.3)
    up = Generator(gen.denoiser, 1.0, [1.0, 3.0])
    with pytest.raises(ValueError, match="not strictly decreasing"):
        export_pipeline(up, tmp_path / "e", base=str(base))
    sd = tmp_path / "sd"
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    tiny_sd_pipeline(sd, kind="sd")
    with pytest.raises(ValueError, match="needs a StableDiffusion3Pipeline"):
        export_pipeline(gen, tmp_path / "f", base=str(sd))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # nothing written
