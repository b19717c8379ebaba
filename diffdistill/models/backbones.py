"""Raw networks ``F(x_in, c_noise, cond)`` that ``EDMDenoiser`` preconditions.

* :class:`UNetBackbone`: a diffusers ``UNet2DModel`` (optionally class-conditional with a null class).
* :class:`MLPBackbone`: a small MLP for 2-D / low-dimensional toys.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from diffdistill.models.conditioning import Conditioning


class GuidanceEmbedding(nn.Module):
    """Embedding of the guidance scale ``w`` for guidance-conditioned students (LCM, Luo et al. 2023, §4.2).

    Sinusoidal features of ``1000 (w - 1)`` (LCM embeds its ``omega = w - 1``) and a two-layer MLP whose last layer
    is zero-initialised, so switching it on leaves a pretrained network's output unchanged.
    """

    def __init__(self, out_dim: int, channels: int = 256, max_period: float = 10000.0):
        super().__init__()
        half = channels // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half))
        self.mlp = nn.Sequential(nn.Linear(channels, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: Tensor) -> Tensor:
        h = 1000.0 * (w.float() - 1.0)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([h.sin(), h.cos()], dim=1))


def has_guidance_embedding(module: nn.Module) -> bool:
    """Whether any backbone inside ``module`` has its guidance embedding switched on."""
    return any(getattr(m, "guidance_emb", None) is not None for m in module.modules())


def _guidance(cond: Conditioning, batch: int, device) -> Tensor:
    """``cond.guidance_scale`` as ``[B]``; ``None`` means ``w = 1`` (no guidance)."""
    if cond.guidance_scale is None:
        return torch.ones(batch, device=device)
    w = cond.guidance_scale.reshape(-1)
    return w.expand(batch) if w.numel() == 1 else w


class UNetBackbone(nn.Module):
    """diffusers ``UNet2DModel`` fed ``c_noise`` as its timestep.

    Args:
        unet_config: keyword arguments of ``UNet2DModel`` (``sample_size``, ``block_out_channels``...).
        num_classes: number of real classes; the model gets ``num_classes + 1`` embeddings, the last
            being the null class used for classifier-free guidance. ``None`` = unconditional.
        c_noise_scale: the UNet's timestep is ``c_noise_scale * c_noise``; 1000 turns EDM's
            ``ln(sigma)/4`` into ``250 ln(sigma)``, the range its sinusoidal embedding resolves well
            (the convention of openai/consistency_models).
        null_class: reserve embedding ``num_classes`` as the null class of classifier-free guidance. Networks
            trained without one (openai's ImageNet-64 EDM teacher) set ``False``; they then need class labels.
    """

    def __init__(
        self,
        unet_config: dict[str, Any],
        num_classes: int | None = None,
        c_noise_scale: float = 1000.0,
        guidance_embedding: bool = False,
        null_class: bool = True,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        cfg = dict(unet_config)
        if num_classes is not None:
            cfg["num_class_embeds"] = num_classes + int(null_class)
        self.unet = UNet2DModel(**cfg)
        self.num_classes, self.null_class = num_classes, null_class
        self.unet_config = dict(unet_config)
        self.c_noise_scale = float(c_noise_scale)
        self.guidance_emb: GuidanceEmbedding | None = None
        self._pending_guidance: Tensor | None = None
        if guidance_embedding:
            self.enable_guidance_embedding()

    def to_config(self) -> dict[str, Any]:
        """Rebuilds this network (random weights) from plain config: see ``diffdistill.models.io.model_config``."""
        return {
            "_target_": "diffdistill.models.backbones.UNetBackbone",
            "unet_config": {k: v for k, v in self.unet_config.items() if not k.startswith("_")},
            "num_classes": self.num_classes,
            "c_noise_scale": self.c_noise_scale,
            "guidance_embedding": self.guidance_emb is not None,
            "null_class": self.null_class,
        }

    def enable_guidance_embedding(self) -> None:
        """Add the (zero-initialised) guidance embedding in place; a no-op if present."""
        if self.guidance_emb is not None:
            return
        p = next(self.unet.parameters())
        self.guidance_emb = GuidanceEmbedding(self.unet.time_embedding.linear_2.out_features).to(p.device)
        self.unet.time_embedding.register_forward_hook(self._add_guidance)

    def _add_guidance(self, module, inputs, output):
        return output if self._pending_guidance is None else output + self._pending_guidance.to(output.dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        subfolder: str | None = None,
        num_classes: int | None = None,
        null_class: bool = False,
        c_noise_scale: float = 1000.0,
        guidance_embedding: bool = False,
    ) -> UNetBackbone:
        """Wrap a saved diffusers ``UNet2DModel`` (a folder or hub id), e.g. openai's EDM ImageNet-64 teacher
        converted by diffusers' ``scripts/convert_consistency_to_diffusers.py``. ``num_classes`` defaults to the
        model's ``num_class_embeds`` (minus one with ``null_class``)."""
        from diffusers import UNet2DModel

        from diffdistill.models.io import local_or_hub

        unet = UNet2DModel.from_pretrained(local_or_hub(path), subfolder=subfolder)
        embeds = unet.config.num_class_embeds
        if num_classes is None and embeds is not None:
            num_classes = embeds - int(null_class)
        if num_classes is not None and embeds != num_classes + int(null_class):
            raise ValueError(
                f"'{path}' has {embeds} class embeddings; num_classes={num_classes} with null_class={null_class} "
                f"needs {num_classes + int(null_class)}"
            )
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "num_class_embeds"}
        net = cls(config, num_classes, c_noise_scale, guidance_embedding=False, null_class=null_class)
        net.unet.load_state_dict(unet.state_dict())
        if guidance_embedding:
            net.enable_guidance_embedding()
        return net

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        s = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, s, s)

    def _labels(self, cond: Conditioning, batch: int, device) -> Tensor | None:
        if self.num_classes is None:
            return None
        if cond.class_labels is None:  # unconditional call on a conditional model: null class
            if not self.null_class:
                raise ValueError(
                    f"this {self.num_classes}-class network was trained without a null class: pass class labels "
                    "(unconditional calls and classifier-free guidance need a null class)"
                )
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return cond.class_labels.long()

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        labels = self._labels(cond, x_in.shape[0], x_in.device)
        if self.guidance_emb is None:
            return self.unet(x_in, self.c_noise_scale * c_noise, class_labels=labels).sample
        self._pending_guidance = self.guidance_emb(_guidance(cond, x_in.shape[0], x_in.device))
        try:
            return self.unet(x_in, self.c_noise_scale * c_noise, class_labels=labels).sample
        finally:
            self._pending_guidance = None

    # what ``features`` costs in forwards of the whole network, for pass counts (the encoder and mid block alone:
    # 0.22 measured on the Fashion-MNIST UNet, CPU)
    feature_pass_cost: float = 0.25

    def features(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> list[Tensor]:
        """Output of each down block and of the mid block (discriminator taps). The forward stops after the mid
        block: the decoder, whose output no tap needs, never runs (DMD2's classifier runs the encoder only)."""
        return forward_taps([*self.unet.down_blocks, self.unet.mid_block], lambda: self.forward(x_in, c_noise, cond))


class _TapsDone(Exception):
    """Raised by :func:`forward_taps` once the last tap is taken, so the rest of the network never runs."""


def _block_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


# set by :func:`denoise_with_features`: ``forward_taps`` then leaves its hooks in place, runs nothing and returns
# nothing, so the network's *whole* forward that follows fills the taps (one pass for the output and the features)
_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("diffdistill_capture_taps", default=None)


def forward_taps(
    modules: list[nn.Module], run: Callable[[], Any], take: Callable[[Any], Tensor] = _block_output
) -> list[Tensor]:
    """``take(output)`` of each of ``modules`` (each runs once), in the order they run inside ``run()``; the forward
    stops as soon as the last of them has run, so the layers after it (a UNet's decoder) never do. ``take``
    defaults to the output itself, or its first entry for blocks that return tuples (diffusers' down blocks)."""
    taps: list[Tensor] = []
    capture = _CAPTURE.get()
    if capture is not None:  # inside denoise_with_features: the caller runs the whole forward
        hooks = [m.register_forward_hook(lambda mod, inp, out: taps.append(take(out))) for m in modules]
        capture.append((taps, hooks, len(modules)))
        return taps

    def tap(module, inputs, output):
        taps.append(take(output))
        if len(taps) == len(modules):
            raise _TapsDone

    hooks = [m.register_forward_hook(tap) for m in modules]
    try:
        run()
    except _TapsDone:
        pass
    finally:
        for h in hooks:
            h.remove()
    return taps


def denoise_with_features(
    network: nn.Module, x: Tensor, sigma: Tensor, cond: Conditioning | None = None
) -> tuple[Tensor, list[Tensor]]:
    """``(network(x, sigma, cond), network.features(x, sigma, cond))`` from **one** forward where the network's
    ``features`` reads its taps through :func:`forward_taps` (the UNet backbones and adapters): the taps are the
    activations of the whole forward, equal to what ``features`` returns. Networks whose ``features`` computes its
    taps otherwise get them from a second (partial) pass, so the result is the same either way."""
    capture: list = []
    token = _CAPTURE.set(capture)
    try:
        taps = network.features(x, sigma, cond)
    finally:
        _CAPTURE.reset(token)
    if not capture:  # features ran on its own: the output needs its own forward
        return network(x, sigma, cond), taps
    (taps, hooks, expected), *rest = capture
    try:
        if rest:
            raise RuntimeError("denoise_with_features: features() read its taps from more than one forward")
        out = network(x, sigma, cond)
    finally:
        for entry in capture:
            for h in entry[1]:
                h.remove()
    if len(taps) != expected:
        raise RuntimeError(
            f"denoise_with_features: {type(network).__name__}'s forward ran {len(taps)} tapped blocks, "
            f"its features() {expected}; use network.features() and a separate forward"
        )
    return out, taps


class FourierEmbedding(nn.Module):
    """Random Fourier features of ``c_noise`` (EDM's ``FourierEmbedding``)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        h = 2 * math.pi * c[:, None].float() * self.freqs[None]
        return torch.cat([h.cos(), h.sin()], dim=1)


class MLPBackbone(nn.Module):
    """A residual MLP on flat ``[B, dim]`` samples, conditioned on ``c_noise`` (and optional classes, and the
    guidance scale when ``guidance_embedding`` is on: off by default so saved configs still load).

    ``fourier_scale``: std of the random Fourier frequencies of ``c_noise`` (EDM: 16). Continuous-time consistency
    training differentiates the network in time, and high frequencies there make that derivative noisy; iCT and
    sCM use small scales (iCT: 0.02).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        num_classes: int | None = None,
        guidance_embedding: bool = False,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.emb = FourierEmbedding(hidden, fourier_scale)
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        self.hidden, self.depth, self.fourier_scale = hidden, depth, float(fourier_scale)
        self.guidance_emb: GuidanceEmbedding | None = None
        if guidance_embedding:
            self.enable_guidance_embedding()

    def to_config(self) -> dict[str, Any]:
        return {
            "_target_": "diffdistill.models.backbones.MLPBackbone",
            "dim": self.dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "num_classes": self.num_classes,
            "guidance_embedding": self.guidance_emb is not None,
            "fourier_scale": self.fourier_scale,
        }

    def enable_guidance_embedding(self) -> None:
        """Add the (zero-initialised) guidance embedding in place; a no-op if present."""
        if self.guidance_emb is None:
            self.guidance_emb = GuidanceEmbedding(self.hidden).to(self.inp.weight.device)

    def _embed(self, c_noise: Tensor, cond: Conditioning, batch: int, device) -> Tensor:
        e = self.emb(c_noise)
        if self.class_emb is not None:
            labels = cond.class_labels
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            e = e + self.class_emb(labels.long())
        if self.guidance_emb is not None:
            e = e + self.guidance_emb(_guidance(cond, batch, device))
        return e

    @property
    def sample_shape(self) -> tuple[int]:
        return (self.dim,)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each residual block's activations in the backward pass (``torch.utils.checkpoint``)."""
        self.gradient_checkpointing = True

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        e = self._embed(c_noise, cond, x_in.shape[0], x_in.device)
        h = self.inp(x_in) + e
        recompute = getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                h = h + torch.utils.checkpoint.checkpoint(blk, h + e, use_reentrant=False)
            else:
                h = h + blk(h + e)
        return self.out(h)

    def features(self, x_in, c_noise, cond):
        e = self._embed(c_noise, cond, x_in.shape[0], x_in.device)
        h = self.inp(x_in) + e
        taps = []
        for blk in self.blocks:
            h = h + blk(h + e)
            taps.append(h)
        return taps
