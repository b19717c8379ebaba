"""Frozen tokenizer(s) + CLIP text encoder(s) of an SD-family pipeline, turning prompts into a :class:`Conditioning`.

The embeddings are computed exactly as the pipelines' own ``encode_prompt`` computes them (diffusers
``pipeline_stable_diffusion.py`` / ``pipeline_stable_diffusion_xl.py``): SD takes the last hidden state of its one
encoder; SDXL concatenates the penultimate hidden states of both encoders and pools from ``text_encoder_2``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning

KINDS = ("sd", "sdxl")


def pipeline_kind(path: str | Path) -> str:
    """``"sd"``, ``"sdxl"`` or ``"sd3"`` from a pipeline folder's ``model_index.json`` (its text encoders)."""
    index = read_model_index(path)
    if "StableDiffusion3" in str(index.get("_class_name", "")):
        return "sd3"
    if index.get("text_encoder_3") is not None and index["text_encoder_3"][0] is not None:
        return "sd3"
    if index.get("text_encoder_2") is not None and index["text_encoder_2"][0] is not None:
        return "sdxl"
    return "sd"


def read_model_index(path: str | Path) -> dict:
    """A pipeline's ``model_index.json`` (local folder or hub id; offline reads the local cache only)."""
    from diffusers import DiffusionPipeline

    from diffdistill.models.io import local_or_hub

    path = local_or_hub(path)
    try:
        return dict(DiffusionPipeline.load_config(str(path)))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"'{path}' is not a diffusers pipeline folder (no model_index.json): {e}") from e


class PromptEncoder(nn.Module):
    """Prompts -> ``Conditioning(prompt_embeds [B, L, D], pooled_prompt_embeds [B, D] or None)``.

    Args:
        tokenizers: one ``CLIPTokenizer`` per text encoder.
        text_encoders: SD: ``[CLIPTextModel]``; SDXL: ``[CLIPTextModel, CLIPTextModelWithProjection]``.
        kind: ``"sd"`` or ``"sdxl"``.
        force_zeros_for_empty_prompt: the null prompt is all zeros (SDXL's pipeline default) instead of the
            empty prompt's embeddings.
        cache_dir: optional folder for a disk cache of embeddings (keyed by the encoders' fingerprint and prompt).
        cache_size: prompts kept in memory (least recently used dropped first); 0 disables the memory cache.
    """

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list[nn.Module],
        kind: str = "sd",
        force_zeros_for_empty_prompt: bool = False,
        cache_dir: str | Path | None = None,
        cache_size: int = 4096,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"PromptEncoder kind must be one of {KINDS}, got '{kind}' (SD3: the flow adapter)")
        if len(tokenizers) != len(text_encoders) or len(text_encoders) != (1 if kind == "sd" else 2):
            raise ValueError(f"'{kind}' needs {1 if kind == 'sd' else 2} tokenizer(s) and text encoder(s)")
        self.kind, self.tokenizers = kind, list(tokenizers)
        self.text_encoders = nn.ModuleList(text_encoders).eval().requires_grad_(False)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor | None]] = OrderedDict()
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, kind: str | None = None, cache_dir: str | Path | None = None, **kw
    ) -> PromptEncoder:
        """Load the tokenizer(s) and text encoder(s) of a pipeline folder or hub id (``kind`` read from
        ``model_index.json`` when not given)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from diffdistill.models.io import local_or_hub

        index = read_model_index(path)
        kind = kind or pipeline_kind(path)
        if kind not in KINDS:
            raise ValueError(f"'{path}' is a '{kind}' pipeline; PromptEncoder handles {KINDS}")
        path = str(local_or_hub(path))
        try:
            tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
            encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
            if kind == "sdxl":
                tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
                encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"could not load the text encoder(s) of '{path}': {e}") from e
        zeros = bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl"))
        return cls(tokenizers, encoders, kind, zeros, cache_dir, **kw)

    def train(self, mode: bool = True) -> PromptEncoder:  # frozen: always in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders.parameters()).device

    # ------------------------------------------------------------------ encoding

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        if self.kind == "sd":
            tok, enc = self.tokenizers[0], self.text_encoders[0]
            ids = _tokenize(tok, prompts)
            mask = None
            if getattr(enc.config, "use_attention_mask", False):
                mask = _tokenize(tok, prompts, mask=True).to(self.device)
            return enc(ids.to(self.device), attention_mask=mask)[0], None
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled output of the projection encoder
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(_tokenize(tok, prompts).to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, prompts: list[str] | str, negative_prompts: list[str] | str | None = None) -> Conditioning:
        """Embed ``prompts`` (and optional ``negative_prompts``, one per prompt or one for all, into the
        ``negative_*`` fields: the unconditional side of CFG)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode expects a non-empty list of prompt strings")
        embeds, pooled = self._lookup(prompts)
        cond = Conditioning(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if negative_prompts is None:
            return cond
        neg = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(neg) != len(prompts):
            raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts (give one, or one per prompt)")
        neg_embeds, neg_pooled = self._lookup(neg)
        cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds = neg_embeds, neg_pooled
        return cond

    @property
    def null_prompt(self) -> Conditioning:
        """The null condition (batch 1): the empty prompt's embeddings, or zeros with
        ``force_zeros_for_empty_prompt`` (as the pipelines build the unconditional side of CFG)."""
        cond = self.encode([""])
        if self.force_zeros_for_empty_prompt:
            cond = cond.map(torch.zeros_like)
        return cond

    # ------------------------------------------------------------------ cache

    def _lookup(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        found: dict[str, tuple[Tensor, Tensor | None]] = {}
        for p in dict.fromkeys(prompts):
            hit = self._cache.get(p)
            if hit is not None:
                self._cache.move_to_end(p)
            elif self.cache_dir is not None:
                hit = self._disk_get(p)
            if hit is not None:
                found[p] = hit
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            embeds, pooled = self._encode_uncached(missing)
            for i, p in enumerate(missing):
                found[p] = (embeds[i].clone(), None if pooled is None else pooled[i].clone())
                if self.cache_dir is not None:
                    self._disk_put(p, found[p])
        for p in missing if self.cache_size > 0 else []:
            self._cache[p] = found[p]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        dev = self.device
        embeds = torch.stack([found[p][0].to(dev) for p in prompts])
        pooled = None if found[prompts[0]][1] is None else torch.stack([found[p][1].to(dev) for p in prompts])
        return embeds, pooled

    def fingerprint(self) -> str:
        """A short hash of the encoders' configs and weights: the disk cache's key (stale entries cannot match)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.kind.encode())
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                h.update(json.dumps(enc.config.to_dict(), sort_keys=True, default=str).encode())
                h.update(str(len(tok)).encode())
                for p in enc.parameters():
                    h.update(p.detach().float().cpu().reshape(-1)[:4096].numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _disk_path(self, prompt: str) -> Path:
        key = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        return self.cache_dir / self.fingerprint() / key[:2] / f"{key}.safetensors"

    def _disk_get(self, prompt: str) -> tuple[Tensor, Tensor | None] | None:
        from safetensors.torch import load_file

        path = self._disk_path(prompt)
        if not path.exists():
            return None
        try:
            d = load_file(str(path))
        except Exception:  # noqa: BLE001 - a torn or foreign file is a cache miss
            return None
        return d["prompt_embeds"], d.get("pooled_prompt_embeds")

    def _disk_put(self, prompt: str, value: tuple[Tensor, Tensor | None]) -> None:
        import os
        import tempfile

        from safetensors.torch import save_file

        path = self._disk_path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"prompt_embeds": value[0].detach().cpu().contiguous()}
        if value[1] is not None:
            tensors["pooled_prompt_embeds"] = value[1].detach().cpu().contiguous()
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, path)  # atomic: concurrent writers of the same prompt write the same bytes


def _tokenize(tokenizer, prompts: list[str], mask: bool = False) -> Tensor:
    """Token ids padded to ``model_max_length`` and truncated, as the SD pipelines tokenize."""
    out = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return out.attention_mask if mask else out.input_ids
