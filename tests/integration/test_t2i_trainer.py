"""Latent text-to-image runs end to end on a tiny SD pipeline: prompt-only data (data-free DMD), captioned pixel
data encoded by the teacher's VAE, precomputed latents; prompt-labelled grids; in-loop CLIP score."""

import json
from pathlib import Path

import pytest
import torch

from diffdistill.training.builders import build_trainer
from tests.helpers import compose_train

PROMPTS = ["a red cube", "blue sky", "a dog", "a cat", "a red cube"]
PANEL = 96  # prompt_grid_image's smallest cell width


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """A tiny SD pipeline (16 px images, 4x8x8 latents), a prompt file and a latents file of captioned images."""
    from diffdistill.data import CaptionedImages, SyntheticImages, encode_latents
    from diffdistill.models.latent import LatentCodec
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("t2i")
    pipe = tiny_sd_pipeline(root / "pipe", kind="sd", image_size=16)
    (root / "prompts.txt").write_text("# grid prompts first\n" + "\n".join(PROMPTS) + "\n")
    names = tuple(f"shape {k}" for k in range(10))
    images = CaptionedImages(SyntheticImages(num=32, resolution=16, channels=3), "a photo of a {}", words=names)
    latents = encode_latents(images, LatentCodec.from_pretrained(pipe), root / "latents.safetensors", batch_size=16)
    return {"pipe": pipe, "prompts": root / "prompts.txt", "latents": latents, "names": names}


def _fashion_mnist_available() -> bool:
    from diffdistill.data.fashion_mnist import locate_fashion_mnist

    try:
        locate_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


DATA = {
    "prompts": lambda t: ["data=prompts", f"data.path={t['prompts']}"],
    # Fashion-MNIST images with captions at the tiny VAE's 16 px (the downsampled smoke-test copies)
    "pixels": lambda t: ["data=fashion_mnist_t2i", "data.split=test", "data.limit=64", "data.resolution=16"],
    "latents": lambda t: ["data=latents", f"data.path={t['latents']}", "data.keep_labels=false"],
}


def _cfg(t2i, run_dir, objective, data, extra=()):
    return compose_train(
        [
            "~experiment",
            "backbone=sd",
            f"backbone.path={t2i['pipe']}",
            "backbone.guidance_scale=2.0",
            f"objective={objective}",
            *DATA[data](t2i),
            "trainer=tiny",
            "trainer.device=cpu",
            "trainer.max_steps=3",
            "trainer.batch_size=2",
            "trainer.sample_every=3",
            "trainer.checkpoint_every=3",
            "trainer.num_grid_samples=8",
            "trainer.teacher_sample_steps=2",
            "student.sigma_init=14.6",
            f"run_dir={run_dir}",
            *extra,
        ]
    )


def _grid_width(k: int) -> int:
    return k * PANEL + (k + 1) * 4


@pytest.mark.parametrize(
    "objective,data",
    [("dmd", "prompts"), ("dmd", "pixels"), ("lcm", "pixels"), ("lcm", "latents")],
)
def test_t2i_run_trains_and_writes_a_prompt_grid(tmp_path, t2i, objective, data):
    """3 steps train (finite losses), checkpoint, and write a grid with one column per distinct caption."""
    from PIL import Image

    if data == "pixels" and not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not installed")
    trainer = build_trainer(_cfg(t2i, tmp_path, objective, data))
    last = trainer.fit()
    assert trainer.step == 3 and torch.isfinite(torch.tensor(last["generator_loss"]))
    assert (tmp_path / "checkpoints" / "step0000003").is_dir()
    want = {
        "prompts": ["a red cube", "blue sky", "a dog", "a cat"],
        "pixels": [f"a photo of a {n}" for n in ("t-shirt", "trouser", "pullover", "dress")],
        "latents": None,
    }[data]
    grid = trainer._grid_prompts()
    if want is not None:
        assert grid[:4] == want
    else:  # the distinct captions of the latents file, in file order
        assert grid == list(dict.fromkeys(trainer.dataset.prompts))[:8]
    png = tmp_path / "samples" / "step0000003.png"
    with Image.open(png) as img:  # decoded 16 px images, one column per prompt
        assert img.width == _grid_width(min(len(grid), 8))
    # the micro-batches the objective saw: prompt embeddings of the teacher's encoder, latents of its VAE; DMD
    # (data-free) gets no VAE encode of images it never reads
    (_, batch), *_ = trainer._micro_batches()
    assert batch.x0 is None or batch.x0.shape[1:] == (4, 8, 8)
    if (objective, data) == ("dmd", "pixels"):
        assert batch.x0 is None
    if objective == "lcm":
        assert batch.x0 is not None
    ref = trainer.teacher.prompt_encoder.encode(batch.prompts).prompt_embeds
    assert torch.equal(batch.cond.prompt_embeds, ref)


def test_grid_prompts_from_the_trainer_config(tmp_path, t2i):
    trainer = build_trainer(_cfg(t2i, tmp_path, "dmd", "prompts", ["trainer.grid_prompts=[one,two]"]))
    assert trainer._grid_prompts() == ["one", "two"]
    _, cond = trainer._grid_inputs()
    ref = trainer.teacher.prompt_encoder.encode(["one", "two"] * 4).prompt_embeds
    assert torch.equal(cond.prompt_embeds, ref)


def test_real_data_objective_refuses_prompt_only_data(tmp_path, t2i):
    with pytest.raises(ValueError, match="serves prompts only.*data=latents"):
        build_trainer(_cfg(t2i, tmp_path, "lcm", "prompts"))


def _tiny_clip(tmp_path: Path):
    """A random open_clip model of a registered tiny config (CLIP score needs no real weights to be computed)."""
    import open_clip

    from diffdistill.evaluation.extractors import CLIP

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    return CLIP("tiny-test-clip", pretrained=False)


def test_in_loop_evaluation_records_clip_score(tmp_path, t2i):
    """The evaluator takes the run's captions, text encoder and VAE; clip_score pairs image i with its prompt."""
    from diffdistill.evaluation import Evaluator

    clip = _tiny_clip(tmp_path)
    ev = Evaluator(metrics=["clip_score"], clip=clip, num_images=6, batch_size=4, seed=0)
    cfg = _cfg(t2i, tmp_path / "run", "dmd", "prompts", ["trainer.eval_every=3"])
    trainer = build_trainer(cfg, evaluator=ev)
    trainer.fit()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["clip_score"] <= 100.0
    assert ev.prompts == ["a red cube", "blue sky", "a dog", "a cat"]
    # the same score from images generated by hand with the prompts of each index
    from diffdistill.evaluation.generation import generate, prompt_conditioning
    from diffdistill.evaluation.metrics import clip_score

    gen = trainer.ema_generator()
    enc, codec = trainer.teacher.prompt_encoder, trainer.teacher.latent
    imgs = generate(gen, 6, seed=0, batch_size=6, cond_fn=prompt_conditioning(ev.prompts, enc), decode=codec.decode)
    text = clip.encode_texts([ev.prompts[i % 4] for i in range(6)])
    want = clip_score(torch.from_numpy(clip.extract(imgs)), text)
    assert evals[0]["clip_cosine"] == pytest.approx(want["clip_cosine"], abs=1e-5)
    assert evals[0]["clip_score"] == pytest.approx(want["clip_score"], abs=1e-3)


# ------------------------------------------------------------------------------------------ every objective
def _objective_names() -> list[str]:
    from diffdistill.objectives import OBJECTIVES

    return sorted(OBJECTIVES)


@pytest.mark.parametrize("name", _objective_names())
def test_every_objective_distils_the_tiny_text_to_image_teacher(tmp_path, t2i, name):
    """Every registered objective on the tiny SD teacher: composes by ``objective=<name>``, trains on latents
    (prompt-only data where the objective needs no real samples), checkpoints, and its student reloads and samples
    from prompts."""
    from diffdistill import load_generator
    from diffdistill.objectives import OBJECTIVES

    cls = OBJECTIVES[name]
    data = "latents" if cls.requires_real_data else "prompts"
    extra = ["trainer.sample_every=0", "student.sigma_init=null"]
    cfg = _cfg(t2i, tmp_path, name, data, extra)
    if cfg.objective.get("distance") == "lpips":  # LPIPS weights are user-supplied, never downloaded
        cfg.objective.distance = "l2"
    trainer = build_trainer(cfg)
    last = trainer.fit()
    losses = {k: v for k, v in last.items() if k.endswith("_loss")}
    assert losses and all(isinstance(v, float) and v == v for v in losses.values()), last
    gen = load_generator(tmp_path / "checkpoints" / "last")
    enc = trainer.teacher.prompt_encoder
    cond = enc.encode(["a dog", "a cat"])
    with torch.no_grad():
        x = gen.sample(torch.randn(2, *gen.sample_shape), cond, generator=torch.Generator().manual_seed(0))
        images = trainer.teacher.latent.decode(x)
    assert x.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the export: a stock StableDiffusionPipeline (verified against diffdistill's sampler when written), which samples
    # from a prompt with the recipe's call
    from diffusers import StableDiffusionPipeline

    from diffdistill.export import export

    result = export(tmp_path, tmp_path / "pipeline")
    assert result.pipeline_class == "StableDiffusionPipeline", result.reason
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    out = pipe(["a dog", "a cat"], generator=torch.Generator().manual_seed(0), output_type="pt", **result.call)
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()


# diffdistill-eval with CLIP score only, from the tiny random open_clip model registered by _tiny_clip
CLIP_EVAL = [
    "eval=clip",
    "eval.metrics=[clip_score]",
    "eval.extractor=null",
    "eval.reference=null",
    "eval.clip=clip_tiny-test-clip",
    "+eval.clip_kwargs.pretrained=false",
    "plot=false",
]


def test_eval_cli_decodes_and_prompts_a_text_to_image_student(tmp_path, t2i):
    """``diffdistill-eval run_dir=<t2i run>`` attaches the run teacher's text encoder and VAE: images are decoded
    latents conditioned on the run's captions (the protocol records both), scored by CLIP against those captions."""
    from diffdistill.cli.evaluate import compose, evaluate
    from diffdistill.evaluation import read_results

    _tiny_clip(tmp_path)  # registers the tiny open_clip config
    build_trainer(_cfg(t2i, tmp_path / "run", "dmd", "prompts", ["trainer.sample_every=0"])).fit()
    over = [f"run_dir={tmp_path / 'run'}", *CLIP_EVAL, "eval.num_images=4", "eval.batch_size=4"]
    out = evaluate(compose(over))
    doc = read_results(out)
    rows = doc["results"]
    assert len(rows) >= 1 and all(0.0 <= r["clip_score"] <= 100.0 for r in rows)
    sampler = doc["protocol"]["sampler"]
    assert sampler["prompts"] and sampler["latent_decoded"]
    assert doc["protocol"]["clip_score_prompts"] == ["a red cube", "blue sky", "a dog", "a cat"]


def test_every_objective_has_a_fashion_mnist_t2i_recipe():
    """``experiment=fashion_mnist_t2i/<objective>`` exists for every registered distillation objective (the teacher's
    own training, ``edm``, is the packaged teacher's build) and composes on the packaged text-to-image teacher."""
    from diffdistill.objectives import OBJECTIVES
    from diffdistill.utils.paths import CONFIG_DIR

    for name in sorted(set(OBJECTIVES) - {"edm"}):
        assert (CONFIG_DIR / "experiment" / "fashion_mnist_t2i" / f"{name}.yaml").exists(), name
        cfg = compose_train([f"experiment=fashion_mnist_t2i/{name}"])
        assert cfg.backbone.path == "fashion_mnist_t2i" and cfg.data.prompts and cfg.export_pipeline, name
        assert cfg.objective._target_.endswith(OBJECTIVES[name].__name__), name


@pytest.mark.parametrize("name", ["lcm", "sid"])
def test_fashion_mnist_t2i_recipes_build_with_exact_timestep_sigmas(tmp_path, name):
    """A few-step recipe (sigmas from ``${dd.sd_sigmas:999,499}``) and a SiD recipe (``sigma_init`` at t = 625) build on
    the packaged teacher, their sigmas sitting on integer DDPM timesteps (what the stock export needs)."""
    from diffdistill.models.consistency import discrete_vp_schedule

    cfg = compose_train([f"experiment=fashion_mnist_t2i/{name}", f"run_dir={tmp_path}", "data.limit=64"])
    gen = build_trainer(cfg).roles["generator"]
    t = discrete_vp_schedule(gen).sigma_to_t(torch.tensor(gen.sampling_sigmas, dtype=torch.float64))
    assert torch.equal(t, t.round()) and float(t[0]) == (999.0 if name == "lcm" else 625.0)


def test_eval_cli_scores_a_text_to_image_teacher(tmp_path):
    """``diffdistill-eval teacher=fashion_mnist_t2i`` samples the packaged pipeline's teacher from the given prompts,
    decodes its latents and CLIP-scores them."""
    from diffdistill.cli.evaluate import compose, evaluate
    from diffdistill.evaluation import read_results

    _tiny_clip(tmp_path)
    over = [
        "teacher=fashion_mnist_t2i",
        f"out={tmp_path / 'teacher.json'}",
        *CLIP_EVAL,
        "+eval.prompts=[a photo of a bag, a photo of a sneaker]",
        "eval.num_images=2",
        "eval.batch_size=2",
        "eval.sampler_steps=3",
    ]
    doc = read_results(evaluate(compose(over)))
    assert doc["protocol"]["sampler"]["latent_decoded"] and 0.0 <= doc["results"][0]["clip_score"] <= 100.0
