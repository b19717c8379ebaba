"""Exported pipelines reproduce diffdistill's own sampler (hand-built students; loaded in a fresh process).

Seeding convention of both sides: ``g = torch.Generator().manual_seed(s)``, unit latents ``randn((B, *shape), g)``
first, then the sampler's per-step noise from the same ``g``; class labels are passed explicitly.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from diffdistill.export import DiffDistillPipeline, choose_pipeline, cm_schedule, export_pipeline, read_metadata
from diffdistill.export.card import CardInfo, base_model, model_card
from diffdistill.models.backbones import MLPBackbone, UNetBackbone
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.consistency import ConsistencyDenoiser
from diffdistill.models.denoiser import EDMDenoiser
from diffdistill.models.generator import Generator
from diffdistill.models.lora import add_lora, has_lora
from tests.export_runner import run_in_fresh_process
from tests.helpers import perturb, tiny_unet2d_config

TOL = 1e-5
B = 3
LABELS = [0, 3, 1]
RECIPE = [80.0, 0.8]


def _unet(num_classes=4, **kw) -> UNetBackbone:
    torch.manual_seed(0)
    return UNetBackbone(tiny_unet2d_config(), num_classes=num_classes, **kw)


def _edm(**kw) -> EDMDenoiser:
    return EDMDenoiser(_unet(**kw))


def _lora(den: EDMDenoiser) -> EDMDenoiser:
    add_lora(den, rank=2)
    return den


def students() -> dict[str, tuple[Generator, dict]]:
    """name -> (student, export options)."""
    karras = [80.0 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80.0 ** (1 / 7)) for r in (0.0, 3 / 17, 6 / 17)]
    return {
        "edm": (Generator(perturb(_edm(), 1), 80.0, RECIPE), {}),
        "cm": (Generator(ConsistencyDenoiser(perturb(_edm(), 2)), 80.0, RECIPE), {}),
        "cm_uncond_karras": (
            Generator(ConsistencyDenoiser(perturb(_edm(num_classes=None), 3)), 80.0, [k**7 for k in karras]),
            {},
        ),
        "cm_small_sigma": (Generator(ConsistencyDenoiser(perturb(_edm(), 11)), 80.0, [80.0, 0.2]), {}),
        "guidance": (
            Generator(
                perturb(_edm(guidance_embedding=True), 4), 80.0, RECIPE, {"w_min": 1.0, "w_max": 3.0, "w_default": 2.0}
            ),
            {},
        ),
        "tcd": (Generator(perturb(_edm(), 5), 80.0, [80.0, 2.0, 0.5]), {"gamma": 0.3}),
        "mlp": (Generator(EDMDenoiser(perturb(MLPBackbone(dim=2, hidden=16, depth=2), 6)), 80.0, [80.0, 1.0]), {}),
        "lora_edm_fused": (Generator(perturb(_lora(_edm()), 7), 80.0, RECIPE), {}),
        "lora_cm_fused": (Generator(ConsistencyDenoiser(perturb(_lora(_edm()), 8)), 80.0, RECIPE), {}),
        "lora_edm_adapters": (Generator(perturb(_lora(_edm()), 9), 80.0, RECIPE), {"lora": "adapters"}),
        "lora_cm_adapters": (
            Generator(ConsistencyDenoiser(perturb(_lora(_edm()), 10)), 80.0, RECIPE),
            {"lora": "adapters"},
        ),
    }


def _reference(gen: Generator, seed: int, steps: str, w: float | None = None, gamma: float | None = None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((B, *gen.sample_shape), generator=g)
    labels = None if gen.num_classes is None else torch.tensor(LABELS)
    cond = Conditioning(class_labels=labels, guidance_scale=None if w is None else torch.full((B,), w))
    with torch.no_grad():
        if steps == "one":
            return gen(z, cond)
        return gen.sample(z, cond, generator=g, gamma=gamma)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every student exported, then sampled by a fresh process that only has the folders."""
    root = tmp_path_factory.mktemp("exports")
    built, jobs = {}, []
    for name, (gen, opts) in students().items():
        res = export_pipeline(gen, root / name, metadata={"objective": "test", "step": 2}, **opts)
        built[name] = (gen, opts, res)
        labels = {} if gen.num_classes is None else {"class_labels": LABELS}
        base = {"batch_size": B, **labels}
        stock = res.kind == "stock"
        one = {"num_inference_steps": 1}
        calls = [
            {"tag": "one", "seed": 11, "kwargs": {**base, **one}, "formats": gen.sample_shape[0] != 2},
            {"tag": "recipe", "seed": 12, "kwargs": base, "recipe": stock},
        ]
        if name == "guidance":
            calls += [{"tag": f"w{w}", "seed": 13, "kwargs": {**base, "guidance_scale": w}} for w in (1.5, 2.5)]
        adapter = str(root / name / "lora") if opts.get("lora") == "adapters" else None
        jobs.append(
            {
                "name": name,
                "folder": str(root / name),
                "pipeline": res.kind,
                "adapter": adapter,
                "calls": calls,
                "snippet": True,
            }
        )
    fresh = run_in_fresh_process(jobs, root)
    return built, fresh


EXPECTED_KIND = {
    "edm": "diffdistill",
    "cm": "stock",
    "cm_uncond_karras": "stock",
    "cm_small_sigma": "stock",  # both samplers re-noise by Song et al. 2023, Alg. 1
    "guidance": "diffdistill",
    "tcd": "diffdistill",
    "mlp": "diffdistill",
    "lora_edm_fused": "diffdistill",
    "lora_cm_fused": "stock",
    "lora_edm_adapters": "diffdistill",
    "lora_cm_adapters": "stock",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_fresh_process_pipeline_reproduces_diffdistill_sampler(exported, name):
    """One step and the recipe's few steps: max |difference| <= 1e-5 in fp32, raw samples and ``pt`` images."""
    built, fresh = exported
    gen, opts, res = built[name]
    assert res.kind == EXPECTED_KIND[name], res.reason
    out = fresh["jobs"][name]
    for tag, seed in (("one", 11), ("recipe", 12)):
        want = _reference(gen, seed, tag, gamma=opts.get("gamma"))
        got = out[tag]["raw"]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= TOL, (name, tag)
        if want.ndim == 4:
            assert (out[tag]["pt"] - (want / 2 + 0.5).clamp(0, 1)).abs().max().item() <= TOL
    # the few-step recipe is a different function from one step (the comparison can fail)
    assert (out["one"]["raw"] - out["recipe"]["raw"]).abs().max() > 1e-3
    assert out["snippet_images"] == 4  # the card's Python snippet loads and samples


def test_guidance_scale_reaches_the_embedding(exported):
    built, fresh = exported
    gen = built["guidance"][0]
    out = fresh["jobs"]["guidance"]
    for w in (1.5, 2.5):
        want = _reference(gen, 13, "recipe", w=w)
        assert (out[f"w{w}"]["raw"] - want).abs().max().item() <= TOL
    assert (out["w1.5"]["raw"] - out["w2.5"]["raw"]).abs().max() > 1e-4


def test_output_types_and_no_training_code(exported):
    _, fresh = exported
    assert fresh["training_imported"] == []  # loading and sampling imports no objective or training code
    one = fresh["jobs"]["edm"]["one"]
    assert one["np_shape"] == [B, 8, 8, 3] and one["pil"] == ["Image", [8, 8], "RGB", B]
    assert fresh["jobs"]["cm"]["one"]["pil"][0] == "Image"
    mlp = fresh["jobs"]["mlp"]["one"]
    assert mlp["pt"].shape == (B, 2) and torch.equal(mlp["pt"], mlp["raw"])  # vectors: raw, not [0, 1] images
    assert (mlp["pt"] < 0).any()


def test_lora_exports(exported):
    """Fused exports are plain networks; adapter exports are base weights + a peft folder that reproduces them."""
    from peft import PeftModel
    from safetensors.torch import load_file

    built, _ = exported
    for name in ("lora_edm_fused", "lora_cm_fused"):
        folder = built[name][2].path
        weights = next(folder.glob("*/diffusion_pytorch_model.safetensors"))
        assert not any("lora" in k for k in load_file(str(weights)))
        assert not (folder / "lora").exists()
    for name in ("lora_edm_adapters", "lora_cm_adapters"):
        folder = built[name][2].path
        assert (folder / "lora" / "adapter_config.json").exists()
        assert (folder / "lora" / "adapter_model.safetensors").exists()
    # peft reads the adapter back onto the exported base UNet and reproduces the live student's network output
    from diffusers import UNet2DModel

    gen = built["lora_cm_adapters"][0]
    base = UNet2DModel.from_pretrained(str(built["lora_cm_adapters"][2].path / "unet"))
    assert not has_lora(base)
    merged = PeftModel.from_pretrained(base, str(built["lora_cm_adapters"][2].path / "lora")).merge_and_unload()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, -50.0]), torch.tensor([0, 2])
    with torch.no_grad():
        want = gen.denoiser.inner.net.unet(x, t, class_labels=y).sample
        got = merged(x, t, class_labels=y).sample
    assert (got - want).abs().max().item() <= TOL


def test_stock_export_has_no_null_class_and_records_the_recipe(exported):
    built, _ = exported
    folder = built["cm"][2].path
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["num_class_embeds"] == 4  # the null row is dropped: the stock pipeline's random labels are real
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_denoised"] is False and sched["sigma_min"] == 0.002 and sched["sigma_max"] == 80.0
    assert sched["_diffdistill_recipe"]["sampling_sigmas"] == RECIPE
    assert sched["_diffdistill_recipe"]["call"]["num_inference_steps"] is None
    own = json.loads((built["tcd"][2].path / "student" / "config.json").read_text())
    assert own["gamma"] == 0.3 and own["sampling_sigmas"] == [80.0, 2.0, 0.5] and own["num_classes"] == 4


def test_random_labels_are_real_classes_and_bad_calls_are_refused(exported):
    built, _ = exported
    pipe = DiffDistillPipeline.from_pretrained(str(built["edm"][2].path))
    labels = pipe._labels(None, 2000, torch.Generator().manual_seed(0), "cpu")
    assert labels.min() >= 0 and labels.max() == 3  # all real classes drawn, never the null class 4
    assert pipe._labels([4], 1, None, "cpu").tolist() == [4]  # the null class on request (unconditional)
    with pytest.raises(ValueError, match="class labels"):
        pipe(batch_size=1, class_labels=[5], output_type="latent")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(batch_size=1, num_inference_steps=3, output_type="latent")
    with pytest.raises(ValueError, match="guidance"):
        pipe(batch_size=1, guidance_scale=2.0, output_type="latent")
    with pytest.raises(ValueError, match="latents"):
        pipe(batch_size=2, latents=torch.randn(1, 3, 8, 8), output_type="latent")
    z = torch.randn(2, 3, 8, 8)  # latents= is the unit noise: same as drawing it
    got = pipe(batch_size=2, class_labels=[1, 2], latents=z, num_inference_steps=1, output_type="latent").images
    want = built["edm"][0](z, Conditioning(class_labels=torch.tensor([1, 2])))
    assert (got - want).abs().max().item() <= TOL


def test_cm_schedule_finds_exact_grids():
    assert cm_schedule([80.0], 0.002).call_kwargs() == {"num_inference_steps": 1}
    k = [80.0 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80.0 ** (1 / 7)) for r in (0.0, 5 / 17)]
    on_grid = cm_schedule([v**7 for v in k], 0.002)
    assert on_grid.rho == 7.0 and on_grid.timesteps == [5, 0] and on_grid.num_train_timesteps == 18
    solved = cm_schedule([80.0, 0.8], 0.002)
    assert solved.num_train_timesteps == 40 and abs(solved.rho - 7) < 0.5
    from diffusers import CMStochasticIterativeScheduler

    sched = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, rho=solved.rho)
    sched.set_timesteps(timesteps=solved.timesteps)
    assert sched.sigmas.tolist()[:2] == torch.tensor([80.0, 0.8]).tolist()
    assert cm_schedule([80.0, 5.0, 0.8], 0.002) is None  # three sigmas off every grid
    assert cm_schedule([80.0, 90.0], 0.002) is None


def test_choose_pipeline_says_why():
    cm = Generator(ConsistencyDenoiser(_edm()), 80.0, RECIPE)
    assert choose_pipeline(cm).kind == "stock"
    assert "TCD" in choose_pipeline(cm, gamma=0.3).reason
    assert choose_pipeline(cm, pipeline="diffdistill").kind == "diffdistill"
    edm = Generator(_edm(), 80.0, RECIPE)
    assert "boundary-condition" in choose_pipeline(edm).reason
    with pytest.raises(ValueError, match="cannot reproduce"):
        choose_pipeline(edm, pipeline="stock")
    guided = Generator(ConsistencyDenoiser(_edm(guidance_embedding=True)), 80.0, RECIPE)
    assert "guidance" in choose_pipeline(guided).reason
    mlp = Generator(ConsistencyDenoiser(EDMDenoiser(MLPBackbone(dim=2))), 80.0, RECIPE)
    assert "MLPBackbone" in choose_pipeline(mlp).reason
    off = Generator(ConsistencyDenoiser(_edm()), 80.0, [80.0, 5.0, 0.8])
    assert "Karras grid" in choose_pipeline(off).reason
    small = Generator(ConsistencyDenoiser(_edm()), 80.0, [80.0, 0.2])  # re-noised by Alg. 1 on both sides
    assert choose_pipeline(small).kind == "stock"


def test_export_leaves_the_student_unchanged(tmp_path):
    gen = Generator(perturb(_lora(_edm()), 3), 80.0, RECIPE)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    export_pipeline(gen, tmp_path / "out", verify=False)
    assert has_lora(gen) and all(torch.equal(before[k], v) for k, v in gen.state_dict().items())


def test_read_metadata_tolerates_missing_and_bad_files(tmp_path):
    assert read_metadata(tmp_path) == {}
    (tmp_path / "diffdistill.json").write_text("{not json")
    assert read_metadata(tmp_path) == {}
    (tmp_path / "diffdistill.json").write_text("[1, 2]")
    assert read_metadata(tmp_path) == {}
    (tmp_path / "diffdistill.json").write_text(json.dumps({"objective": "dmd"}))
    assert read_metadata(tmp_path) == {"objective": "dmd"}


def test_model_card_front_matter_and_metrics():
    meta = {
        "objective": "dmd",
        "paper": {"title": "One-step Diffusion with Distribution Matching Distillation", "arxiv": "2311.18828"},
        "step": 400,
        "train_seconds": 240.5,
        "batch_size": 32,
        "teacher": "openai/diffusers-cd_imagenet64_l2",
        "ema_decay": 0.999,
    }
    evals = [
        (
            "effnet.json",
            {
                "protocol": {"metrics": ["fid"], "num_images": 1000, "seed_range": [0, 1000]},
                "results": [
                    {"step": 200, "ema": "0.999", "sampler_steps": 1, "fid": 50.0},
                    {"step": 400, "ema": "0.999", "sampler_steps": 1, "fid": 12.3456},
                ],
            },
        )
    ]
    info = CardInfo(
        "me/dmd-fm",
        "DiffDistillPipeline",
        "why",
        [80.0],
        80.0,
        num_classes=10,
        sample_shape=[1, 32, 32],
        metadata=meta,
        evals=evals,
    )
    card = model_card(info)
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffdistill", "distillation", "dmd", "one-step", "class-conditional"} <= set(front["tags"])
    assert front["base_model"] == "openai/diffusers-cd_imagenet64_l2"
    assert "arXiv:2311.18828" in card and "Training iterations: 400" in card and "240 s" in card
    assert "| 400 | 0.999 | 1 | 12.35 |" in card and "| 200 |" not in card  # only this export's step and track
    assert "DiffDistillPipeline.from_pretrained(" + '"me/dmd-fm")' in card  # the card names the (mocked) hub id
    assert base_model("diffdistill.models.teacher.Teacher") is None and base_model("/abs/path") is None
