"""The discriminator role: light trainable heads on feature taps of a network that is passed in at call time.

DMD2 (Yin et al. 2024, arXiv:2405.14867, §4.2) puts a classifier on the fake score's bottleneck; SiDA reuses the
fake score's encoder the same way; LADD (Sauer et al. 2024, arXiv:2403.12015) puts heads on the frozen teacher's
features; ADD (Sauer et al. 2023, arXiv:2311.17042) on a frozen feature network. All have one shape: a backbone
evaluated on *noised* inputs, some of its intermediate activations ("taps"), one small head per tap, one logit per
head and sample. :class:`Discriminator` is that shape and nothing else.

API (for objectives built on it):

* ``Discriminator.for_network(network, taps=(-1,), head="conv", hidden=None)`` probes ``network.features`` once
  (any :class:`~diffdistill.models.denoiser.Denoiser` with ``features``: the diffusers UNet backbones return the
  output of each down block and of the mid block, the MLP backbone the output of each residual block) and builds
  one head per tap. ``taps`` are indices into that list (``-1``: the bottleneck of a UNet) or ``"input"``: the
  preconditioned input itself, ``c_in x`` with ``c_noise`` appended (a plain diffusion-GAN discriminator; works
  with any denoiser, analytic ones included).
* ``disc(network, x, sigma, cond)`` -> logits ``[B, heads]``; ``disc.logits(features, x, sigma)`` when the caller
  already has the features (one forward of the network for several uses).
* Heads: ``"conv"`` (DMD2's head on a ``[B, C, H, W]`` map: conv 4x4 stride 2, GroupNorm, SiLU, repeated until
  the map is 4x4 (once on DMD2's 8x8 SD1.5 / ImageNet bottleneck, three times on SDXL's 32x32), a conv whose
  kernel covers what is left (4x4 stride 4), GroupNorm, SiLU, conv 1x1 to one logit, averaged over any remaining
  positions) and ``"mlp"`` (per position or token: linear, SiLU, linear to one logit,
  averaged over positions; takes ``[B, C]``, ``[B, L, C]`` and ``[B, C, H, W]``).
* Losses and the R1 penalty live in ``diffdistill/objectives/gan.py`` (``ns`` / ``hinge``, R1 ``exact`` /
  ``approx``).

The module holds only the heads: the network whose features it reads is never a submodule, so a discriminator on
the fake score's taps does not duplicate the fake score's weights in a checkpoint, and a saved discriminator
rebuilds alone from its ``config.json`` (``to_config``). Which parameters get gradients in which update is the
trainer's business: in the generator update the heads and the feature network are frozen, and the gradient of the
generator's GAN term reaches the generator through the network's (frozen) activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffdistill.conventions import append_dims, as_sigma, edm_precond
from diffdistill.models.conditioning import Conditioning, as_conditioning

HEADS = ("conv", "mlp")
INPUT_TAP = "input"


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32 (DMD2's head, 24 channels a group at 768), each group at least 8 channels wide
    (after the last conv the map is 1x1, where a group of one channel would normalise every input to 0)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0 and channels // g >= min(8, channels))


CONV_DOWNSAMPLING = ("once", "to_4x4")


def conv_head_blocks(spatial: int, downsample: str = "to_4x4") -> list[int]:
    """The map side after each stride-2 block (conv 4x4, stride 2, padding 1) of a :class:`ConvHead`: one block
    (``"once"``), or blocks repeated until the side is at most 4 (``"to_4x4"``, DMD2's SDXL head on a 32x32 map:
    32 -> 16 -> 8 -> 4; on maps of 8 or less it is one block, as ``"once"``)."""
    if downsample not in CONV_DOWNSAMPLING:
        raise ValueError(f"discriminator conv_downsample must be one of {CONV_DOWNSAMPLING}, got {downsample!r}")
    sides = [(spatial + 2 - 4) // 2 + 1]
    while downsample == "to_4x4" and sides[-1] > 4:
        sides.append((sides[-1] + 2 - 4) // 2 + 1)
    return sides


class ConvHead(nn.Module):
    """DMD2's classifier head on a ``[B, C, H, W]`` feature map (``tianweiy/DMD2`` ``main/edm/edm_guidance.py``,
    ``main/sd_guidance.py``): stride-2 blocks (conv 4x4/2, GroupNorm, SiLU; one, or repeated to a 4x4 map: SDXL's
    three on 32x32), then a conv over the rest (4x4/4 on a 4x4 map), GroupNorm, SiLU, conv 1x1 to one logit
    (averaged over positions if any remain)."""

    def __init__(self, channels: int, spatial: int, hidden: int | None = None, downsample: str = "once"):
        super().__init__()
        h = int(hidden or channels)
        sides = conv_head_blocks(spatial, downsample)
        if sides[0] < 1:
            raise ValueError(f"discriminator_heads: a conv head needs a feature map of at least 2x2, got {spatial}")
        k = min(4, sides[-1])
        layers: list[nn.Module] = []
        for i in range(len(sides)):
            layers += [nn.Conv2d(channels if i == 0 else h, h, kernel_size=4, stride=2, padding=1)]
            layers += [nn.GroupNorm(_groups(h), h), nn.SiLU()]
        self.net = nn.Sequential(
            *layers,
            nn.Conv2d(h, h, kernel_size=k, stride=k),
            nn.GroupNorm(_groups(h), h),
            nn.SiLU(),
            nn.Conv2d(h, 1, kernel_size=1),
        )

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f).flatten(1).mean(1)


class MLPHead(nn.Module):
    """Linear, SiLU, linear to one logit per position or token, averaged over positions."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        h = int(hidden or channels)
        self.net = nn.Sequential(nn.Linear(channels, h), nn.SiLU(), nn.Linear(h, 1))

    def forward(self, f: Tensor) -> Tensor:
        if f.ndim == 4:  # [B, C, H, W] -> tokens [B, HW, C]
            f = f.flatten(2).transpose(1, 2)
        elif f.ndim == 2:
            f = f[:, None]
        return self.net(f)[..., 0].mean(1)


def input_tap(x: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """The ``"input"`` tap: ``c_in x`` with ``c_noise`` appended as one more channel (EDM Eq. 7 scalings)."""
    _, _, c_in, c_noise = edm_precond(sigma, sigma_data)
    x_in = append_dims(c_in, x.ndim) * x
    level = append_dims(c_noise, x.ndim).expand(x.shape[0], 1, *x.shape[2:])
    return torch.cat([x_in, level.to(x_in.dtype)], dim=1)


class Discriminator(nn.Module):
    """Trainable heads on feature taps of a network passed in at call time (see the module docstring).

    Args:
        taps: indices into ``network.features(...)`` (``-1`` = the last: a UNet's bottleneck) or ``"input"``.
        tap_shapes: the shape of each tap without the batch dim (what :meth:`for_network` probes).
        head: ``"conv"`` (DMD2, feature maps only) or ``"mlp"``.
        hidden: head width (``None``: the tap's channels, as in DMD2).
        sigma_data: scaling of the ``"input"`` tap.
        conv_downsample: stride-2 blocks of a conv head: ``"once"`` (the default of saved heads that predate the
            key) or ``"to_4x4"`` (repeated until the map is 4x4, DMD2's SDXL head; what :meth:`for_network` builds;
            identical to ``"once"`` on maps of 8x8 or less).
    """

    def __init__(
        self,
        taps: list[int | str],
        tap_shapes: list[list[int]],
        head: str = "conv",
        hidden: int | None = None,
        sigma_data: float = 0.5,
        conv_downsample: str = "once",
    ):
        super().__init__()
        if conv_downsample not in CONV_DOWNSAMPLING:
            raise ValueError(
                f"discriminator conv_downsample must be one of {CONV_DOWNSAMPLING}, got {conv_downsample!r}"
            )
        if head not in HEADS:
            raise ValueError(f"discriminator_heads.head must be one of {HEADS}, got {head!r}")
        if not taps or len(taps) != len(tap_shapes):
            raise ValueError(f"discriminator_heads.taps must be a non-empty list, got {taps!r}")
        self.taps = [t if t == INPUT_TAP else int(t) for t in taps]
        self.tap_shapes = [[int(s) for s in shape] for shape in tap_shapes]
        self.head, self.hidden, self.sigma_data = head, hidden, float(sigma_data)
        self.conv_downsample = conv_downsample
        heads = []
        for tap, shape in zip(self.taps, self.tap_shapes):
            if head == "conv":
                if len(shape) != 3:
                    raise ValueError(
                        f"discriminator_heads: tap {tap!r} has shape {shape}; a conv head needs [C, H, W] maps "
                        "(use head: mlp)"
                    )
                heads.append(ConvHead(shape[0], min(shape[1:]), hidden, conv_downsample))
            else:
                heads.append(MLPHead(shape[-1] if len(shape) == 2 else shape[0], hidden))
        self.heads = nn.ModuleList(heads)

    @classmethod
    def for_network(
        cls,
        network: nn.Module | None,
        taps: list[int | str] = (-1,),
        head: str = "conv",
        hidden: int | None = None,
        sample_shape: tuple[int, ...] | None = None,
        sigma_data: float | None = None,
        conv_downsample: str = "to_4x4",
    ) -> Discriminator:
        """Heads sized for ``network``'s taps, found by one probing forward (no gradient); conv heads downsample to
        a 4x4 map (``conv_downsample``)."""
        taps = [t if t == INPUT_TAP else int(t) for t in taps]
        shape = tuple(sample_shape or network.sample_shape)
        sd = float(sigma_data if sigma_data is not None else getattr(network, "sigma_data", 0.5))
        x = torch.zeros(2, *shape)
        if network is not None:
            p = next(iter(network.parameters()), None)
            x = x.to(p.device) if p is not None else x
        sigma = torch.ones(2, device=x.device)
        feats: list[Tensor] = []
        if any(t != INPUT_TAP for t in taps):
            if network is None or not hasattr(network, "features"):
                raise ValueError("discriminator_heads.taps: integer taps need a network with `features`")
            k = getattr(network, "num_classes", None)
            cond = Conditioning(class_labels=torch.zeros(2, dtype=torch.long, device=x.device)) if k else None
            with torch.no_grad():
                try:
                    feats = network.features(x, sigma, cond)
                except NotImplementedError as e:
                    raise ValueError(f"discriminator_heads.taps: {e}; use taps: [input]") from None
        shapes = []
        for t in taps:
            if t == INPUT_TAP:
                shapes.append(list(input_tap(x, sigma, sd).shape[1:]))
            elif not -len(feats) <= t < len(feats):
                raise ValueError(f"discriminator_heads.taps: tap {t} out of range, the network has {len(feats)} taps")
            else:
                shapes.append(list(feats[t].shape[1:]))
        return cls(taps, shapes, head, hidden, sd, conv_downsample)

    def to_config(self) -> dict[str, Any]:
        """Rebuilds these heads alone (see ``diffdistill.models.io.model_config``)."""
        return {
            "_target_": "diffdistill.models.discriminator.Discriminator",
            "taps": list(self.taps),
            "tap_shapes": self.tap_shapes,
            "head": self.head,
            "hidden": self.hidden,
            "sigma_data": self.sigma_data,
            "conv_downsample": self.conv_downsample,
        }

    @property
    def sample_shape(self) -> None:
        """Not a sample-space model (the trainer's image-only options skip it)."""
        return None

    @property
    def needs_features(self) -> bool:
        return any(t != INPUT_TAP for t in self.taps)

    def features(self, network: nn.Module | None, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> list[Tensor]:
        """``network.features(x, sigma, cond)`` (empty when every tap is ``"input"``)."""
        if not self.needs_features:
            return []
        return network.features(x, as_sigma(sigma, x.shape[0], x.device), as_conditioning(cond))

    def logits(self, features: list[Tensor], x: Tensor, sigma: Tensor) -> Tensor:
        """Logits ``[B, heads]`` from precomputed ``features`` of the noised input ``x`` at ``sigma``."""
        out = []
        for tap, head in zip(self.taps, self.heads):
            f = input_tap(x, sigma, self.sigma_data) if tap == INPUT_TAP else features[tap]
            out.append(head(f.float()))
        return torch.stack(out, dim=1)

    def forward(
        self, network: nn.Module | None, x: Tensor, sigma: Tensor | float, cond: Conditioning | None = None
    ) -> Tensor:
        """Logits ``[B, heads]`` of the noised input ``x`` at ``sigma``, read from ``network``'s taps."""
        sigma = as_sigma(sigma, x.shape[0], x.device)
        return self.logits(self.features(network, x, sigma, cond), x, sigma)


def feature_pass_cost(network: nn.Module | None, discriminator: Discriminator) -> float:
    """What one pass of ``discriminator``'s taps through ``network`` costs, in whole forwards, for pass counts: 0
    when every tap is ``"input"``, the backbone's ``feature_pass_cost`` (a UNet stops after its mid block), else 1."""
    if network is None or not discriminator.needs_features:
        return 0.0
    costs = [float(m.feature_pass_cost) for m in network.modules() if hasattr(m, "feature_pass_cost")]
    return costs[0] if costs else 1.0
