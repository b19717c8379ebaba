"""Build the packaged tiny text-to-image teacher: Fashion-MNIST in the latent space of a small VAE trained here.

    python scripts/build_t2i_teacher.py --work /tmp/fm_t2i all

Stages (each reads the previous stages' outputs from ``--work``; ``all`` runs them in order):

- ``vae``: an ``AutoencoderKL`` (32x32x3 <-> 4x8x8) fitted by :func:`diffdistill.models.vae_fit.fit_vae`;
- ``text``: the real CLIP BPE tokenizer (open_clip's bundled vocabulary) and a tiny random ``CLIPTextModel``, frozen;
- ``latents``: the training set's scaled posterior-mean latents and the 11 prompt embeddings (10 classes + empty);
- ``unet``: a ``UNet2DConditionModel`` trained by the DDPM eps objective (Ho et al. 2020, Eq. 14) on SD's
  scaled-linear schedule, 10% of the prompts dropped to the empty prompt for classifier-free guidance;
- ``assemble``: a ``StableDiffusionPipeline`` folder (``--out``, default the packaged one) and a sample grid;
- ``fid`` (not in ``all``): FID-EffNet of the built folder's samples, with the VAE's reconstruction floor.

Every random draw comes from ``--seed``; the recipe is recorded in the folder's ``BUILD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from diffdistill.data.fashion_mnist import PROMPT_WORDS
from diffdistill.utils.paths import ASSETS

TEACHER_FOLDER = ASSETS / "teachers" / "fashion_mnist_t2i"
PROMPT_TEMPLATE = "a photo of a {}"
CLASS_WORDS = PROMPT_WORDS  # "t-shirt", "trouser", ..., "ankle boot": the class names as caption words
TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 32,
}
TOKEN_EMBEDDING_STD = 0.6
UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],  # cross-attention at 4x4 and in the mid block
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [48, 96],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
# SD 1.x's training schedule (CompVis/stable-diffusion v1-inference.yaml: linear_start 0.00085, linear_end 0.012).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def prompts() -> list[str]:
    """The 10 class prompts, in label order."""
    return [PROMPT_TEMPLATE.format(w) for w in CLASS_WORDS]


def log_to(path: Path):
    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def fashion_mnist_rgb(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST padded 28 -> 32, grey replicated to RGB, float in ``[-1, 1]``; and the labels."""
    from diffdistill.data.fashion_mnist import FashionMNIST

    ds = FashionMNIST(split=split, resolution=32, limit=limit)
    images = ds.images.float().div(127.5).sub(1.0).repeat(1, 3, 1, 1)
    return images, ds.labels.clone()


def save_clip_tokenizer(folder: Path) -> None:
    """The real CLIP BPE tokenizer (open_clip's bundled vocabulary, :func:`diffdistill.models.tokenizer.clip_vocab`) as
    a ``CLIPTokenizer`` folder: ``vocab.json`` + ``merges.txt`` (1.4 MB; ``save_pretrained`` would write a 3.5 MB
    ``tokenizer.json``), ``model_max_length`` 77 as SD's tokenizer."""
    from diffdistill.models.tokenizer import clip_vocab

    vocab, merges = clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- stages


def stage_vae(args, log) -> None:
    from diffdistill.models.vae_fit import fit_vae

    images, _ = fashion_mnist_rgb("train")
    torch.set_num_threads(args.threads)
    vae = fit_vae(
        images, steps=args.vae_steps, batch_size=args.vae_batch_size, lr=1e-3, kl_weight=1e-5, seed=args.seed, log=log
    )
    vae.save_pretrained(args.work / "vae")
    test, _ = fashion_mnist_rgb("test", limit=1000)
    with torch.no_grad():
        rec = vae.decode(vae.encode(test).latent_dist.mean).sample.clamp(-1, 1)
    l1 = (rec - test).abs().mean().item()
    log(f"vae test L1 {l1:.4f} (1000 test images, posterior mean)")
    save_grid(torch.cat([test[:32], rec[:32]]), args.work / "vae_recon.png", nrow=16)


def stage_text(args, log) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    save_clip_tokenizer(args.work / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(args.work / "tokenizer")
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        enc = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
        # Token embeddings N(0, 0.6^2) instead of CLIP's N(0, 0.02^2): at CLIP's scale the random attention and MLP
        # outputs swamp a token's own embedding and the 10 class prompts' class-token states have cosine ~0.95.
        with torch.no_grad():
            enc.get_input_embeddings().weight.mul_(TOKEN_EMBEDDING_STD / 0.02)
    enc.save_pretrained(args.work / "text_encoder")
    emb = encode_prompts(tok, enc, prompts())
    ids = tok(prompts(), padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = ids.ne(tok.convert_tokens_to_ids("a</w>")).logical_and(torch.arange(77) > 4).float().argmax(1)
    cls = torch.nn.functional.normalize(emb[torch.arange(10), first], dim=1)
    off = (cls @ cls.T)[~torch.eye(10, dtype=torch.bool)]
    log(f"text encoder: class-token state cosine between the 10 prompts max {off.max():.3f} mean {off.mean():.3f}")


@torch.no_grad()
def encode_prompts(tok, enc, texts: list[str]) -> torch.Tensor:
    """``last_hidden_state`` of the padded prompts, as ``StableDiffusionPipeline.encode_prompt`` computes it."""
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return enc(ids.input_ids)[0]


def stage_latents(args, log) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.work / "vae").eval()
    images, labels = fashion_mnist_rgb("train")
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            out.append(vae.encode(images[i : i + 1000]).latent_dist.mean * vae.config.scaling_factor)
    latents = torch.cat(out)
    log(f"latents {tuple(latents.shape)} mean {latents.mean():.4f} std {latents.std():.4f}")
    tok = CLIPTokenizer.from_pretrained(args.work / "tokenizer")
    enc = CLIPTextModel.from_pretrained(args.work / "text_encoder").eval()
    emb = encode_prompts(tok, enc, prompts() + [""])
    torch.save({"latents": latents, "labels": labels, "prompt_embeds": emb}, args.work / "latents.pt")


def stage_unet(args, log) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    data = torch.load(args.work / "latents.pt")
    latents, labels, emb = data["latents"], data["labels"], data["prompt_embeds"]
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = sched.alphas_cumprod
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = UNet2DConditionModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    steps, bs = args.unet_steps, args.batch_size
    warmup = 200
    order, pos, running, start = torch.randperm(len(latents), generator=g), 0, 0.0, time.time()
    for step in range(steps):
        if pos + bs > len(order):
            order, pos = torch.randperm(len(latents), generator=g), 0
        idx = order[pos : pos + bs]
        pos += bs
        x0 = latents[idx]
        cond = labels[idx].clone()
        cond[torch.rand(bs, generator=g) < args.prompt_dropout] = 10  # the empty prompt (CFG's unconditional side)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # (Ho et al. 2020, Eq. 4)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (unet(x_t, t, encoder_hidden_states=emb[cond]).sample - eps).square().mean()  # (Ho et al., Eq. 14)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % 50 == 0:
            log(f"unet step {step + 1}/{steps} loss {running / 50:.4f} lr {lr:.2e} ({time.time() - start:.0f}s)")
            running = 0.0
        if (step + 1) % 500 == 0 or step + 1 == steps:
            ema.save_pretrained(args.work / "unet")
    log("unet saved (EMA)")


def stage_assemble(args, log) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(args.work / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(args.work / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(args.work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(args.work / "unet"),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    shutil.rmtree(args.out / "tokenizer")  # vocab.json + merges.txt instead of save_pretrained's 3.5 MB tokenizer.json
    save_clip_tokenizer(args.out / "tokenizer")
    (args.out / "prompts.json").write_text(json.dumps({"template": PROMPT_TEMPLATE, "classes": CLASS_WORDS}) + "\n")
    log(f"pipeline saved to {args.out}")
    if args.grid:
        sample_grid(args.out, Path(args.grid), log)


@torch.no_grad()
def sample_grid(folder: Path, path: Path, log, per_scale: int = 6, steps: int = 25) -> None:
    """Rows = the 10 class prompts; columns = ``per_scale`` seeds at CFG 1, the same seeds at CFG 3, then at 7.5
    (diffusers' default); the folder's own scheduler (DDPM, ancestral), ``steps`` steps: the stock pipeline call."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scales = (1.0, 3.0, 7.5)
    blocks = []
    for w in scales:
        gens = [torch.Generator().manual_seed(i) for _ in range(10) for i in range(per_scale)]
        out = pipe(
            [p for p in prompts() for _ in range(per_scale)],
            num_inference_steps=steps,
            guidance_scale=w,
            generator=gens,
            output_type="pt",
        ).images
        blocks.append(out.view(10, per_scale, *out.shape[1:]))
    grid = torch.cat(blocks, dim=1).flatten(0, 1) * 2 - 1
    save_grid(grid, path, nrow=len(scales) * per_scale)
    rows = ", ".join(CLASS_WORDS)
    log(f"sample grid {path} (rows: {rows}; {per_scale} seeds at each CFG of {scales}, {steps} steps)")


@torch.no_grad()
def stage_fid(args, log) -> None:
    """FID (EfficientNet-Lite0 features at 128 px) of 500 teacher samples (50 per class prompt, seeds 0..49, the
    folder's scheduler, 25 steps) at CFG 1, 3, 7.5 against 5,000 Fashion-MNIST test images (the subset and extractor of
    benchmarks/results/fm_quality_cpu.json); floors: 500 training images, and their VAE reconstructions."""
    from diffusers import StableDiffusionPipeline

    from diffdistill.data.fashion_mnist import FashionMNIST
    from diffdistill.evaluation.extractors import build_extractor
    from diffdistill.evaluation.metrics import feature_stats, frechet_distance
    from diffdistill.evaluation.reference import reference_stats
    from diffdistill.models.latent import LatentCodec

    torch.set_num_threads(args.threads)
    ext = build_extractor("effnet_lite0_128")
    ref = reference_stats(FashionMNIST(split="test", resolution=32), ext, num_images=5000)

    def fid_of(images01: torch.Tensor) -> float:
        mu, cov = feature_stats(ext.extract((images01.clamp(0, 1) * 255).round().to(torch.uint8)))
        return round(float(frechet_distance(mu, cov, ref.mu, ref.sigma)), 2)

    pipe = StableDiffusionPipeline.from_pretrained(args.out)
    pipe.set_progress_bar_config(disable=True)
    result = {"extractor": ext.protocol(), "reference": "fashion_mnist test, 5000 images (seed-0 subset)", "fid": {}}
    for w in (1.0, 3.0, 7.5):
        images = []
        for p in prompts():
            gens = [torch.Generator().manual_seed(i) for i in range(50)]
            out = pipe([p] * 50, num_inference_steps=25, guidance_scale=w, generator=gens, output_type="pt")
            images.append(out.images)
        result["fid"][f"teacher_cfg_{w}"] = fid_of(torch.cat(images))
        log(f"fid teacher CFG {w}: {result['fid'][f'teacher_cfg_{w}']}")
    real, _ = fashion_mnist_rgb("train", limit=500)
    codec = LatentCodec.from_pretrained(args.out)
    result["fid"]["real_train_500"] = fid_of(real * 0.5 + 0.5)
    result["fid"]["vae_reconstruction_500"] = fid_of(codec.decode(codec.encode(real)) * 0.5 + 0.5)
    log(f"fid {result['fid']}")
    if args.fid_json:
        Path(args.fid_json).write_text(json.dumps(result, indent=1) + "\n")


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1, pad_value=1.0)


STAGES = {
    "vae": stage_vae,
    "text": stage_text,
    "latents": stage_latents,
    "unet": stage_unet,
    "assemble": stage_assemble,
}
EXTRA_STAGES = {"fid": stage_fid}  # not part of ``all``: an evaluation of the built folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*STAGES, *EXTRA_STAGES, "all"])
    p.add_argument("--work", type=Path, required=True, help="folder for the intermediate models and logs")
    p.add_argument("--out", type=Path, default=TEACHER_FOLDER, help="the pipeline folder (default: the packaged one)")
    p.add_argument("--grid", default=None, help="PNG path for the sample grid written by the assemble stage")
    p.add_argument("--fid-json", default=None, help="JSON path for the fid stage's scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log = log_to(args.work / "build.log")
    log(f"build {args.stage}: {vars(args)}")
    for name in STAGES if args.stage == "all" else [args.stage]:
        {**STAGES, **EXTRA_STAGES}[name](args, log)


if __name__ == "__main__":
    main()
