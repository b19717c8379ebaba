"""Prompt data, precomputed latents, batch preparation (text encoder, VAE), prompt grids and prompt evaluation."""

import json

import pytest
import torch
from torch import nn

from diffdistill.data import CocoCaptions, DataStream, FashionMNIST, InfiniteBatcher, PromptFile, SyntheticImages
from diffdistill.data.latents import LatentDataset, encode_latents
from diffdistill.data.prompts import CaptionedImages, dataset_prompts
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.training.conditioning import prepare_batch
from diffdistill.training.trainer import check_data_matches

CLASSES = tuple(f"class{k}" for k in range(10))


# ---------------------------------------------------------------------------------------------- prompt files
def test_prompt_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n  a red cube \n\n#another\nblue sky\n   \nthird # not a comment\n")
    ds = PromptFile(str(f))
    assert ds.prompts == ["a red cube", "blue sky", "third # not a comment"]
    assert len(ds) == 3 and ds.sample_shape is None
    b = ds.get(torch.tensor([2, 0]))
    assert b.x0 is None and b.prompts == ["third # not a comment", "a red cube"] and b.batch_size == 2
    assert PromptFile(str(f), limit=1).prompts == ["a red cube"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        PromptFile(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        PromptFile(str(tmp_path / "empty.txt"))


def _coco(path, anns):
    path.write_text(json.dumps({"images": [], "annotations": anns}))
    return str(path)


def test_coco_captions_parse_with_image_ids(tmp_path):
    anns = [
        {"id": 1, "image_id": 10, "caption": "A man riding a horse. "},
        {"id": 2, "image_id": 10, "caption": "a person on a horse"},
        {"id": 3, "image_id": 7, "caption": "   "},
        {"id": 4, "image_id": 7, "caption": "two dogs"},
    ]
    ds = CocoCaptions(_coco(tmp_path / "captions_val2017.json", anns))
    assert ds.prompts == ["A man riding a horse.", "a person on a horse", "two dogs"]
    assert ds.image_ids == [10, 10, 7] and ds.name == "coco_captions-val2017"
    assert ds.get(torch.tensor([1])).prompts == ["a person on a horse"]


def test_coco_captions_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CocoCaptions(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoCaptions(str(tmp_path / "bad.json"))
    (tmp_path / "noann.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no 'annotations' list"):
        CocoCaptions(str(tmp_path / "noann.json"))
    with pytest.raises(ValueError, match="annotation 1 has no 'caption'"):
        CocoCaptions(_coco(tmp_path / "c.json", [{"caption": "x"}, {"image_id": 3}]))
    with pytest.raises(ValueError, match="holds no captions"):
        CocoCaptions(_coco(tmp_path / "e.json", []))


def test_prompt_batches_are_deterministic_and_sharded_with_the_samples(tmp_path):
    """Two processes (and accumulation 2) take disjoint prompt slices that together are the global batch."""
    f = tmp_path / "p.txt"
    f.write_text("\n".join(f"prompt {i}" for i in range(20)))
    ds = PromptFile(str(f))
    a, b = InfiniteBatcher(ds, 8, seed=3), InfiniteBatcher(ds, 8, seed=3)
    assert [a.next().prompts for _ in range(4)] == [b.next().prompts for _ in range(4)]
    whole = DataStream(ds, 8, seed=1).next()[0][1].prompts
    shards = [DataStream(ds, 2, accumulation=2, world_size=2, rank=r, seed=1).next() for r in range(2)]
    got = [p for s in shards for _, batch in s for p in batch.prompts]
    assert got == whole and len(set(got)) == 8


# ---------------------------------------------------------------------------------------------- captioned images
def test_captioned_images_carry_class_prompts():
    base = SyntheticImages(num=32, resolution=8, channels=3, num_classes=10)
    ds = CaptionedImages(base, "a photo of a {}", keep_labels=False, words=CLASSES)
    b = ds.get(torch.arange(6))
    assert b.cond.class_labels is None and ds.num_classes is None
    assert b.prompts == [f"a photo of a class{int(k)}" for k in base.labels[:6]]
    assert torch.equal(b.x0, base.get(torch.arange(6)).x0)
    kept = CaptionedImages(base, "a photo of a {}", words=CLASSES).get(torch.arange(6))
    assert torch.equal(kept.cond.class_labels, base.labels[:6])
    assert dataset_prompts(ds, 3) == ["a photo of a class0", "a photo of a class1", "a photo of a class2"]
    with pytest.raises(ValueError, match="must contain"):
        CaptionedImages(base, "no slot", words=CLASSES)


def test_fashion_mnist_t2i_mode():
    """data=fashion_mnist_t2i: 32x32 RGB (grey replicated), captions from the class names, no labels."""
    pytest.importorskip("numpy")
    try:
        ds = FashionMNIST(limit=8, channels=3, prompts="a photo of a {}", keep_labels=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed")
    b = ds.get(torch.arange(4))
    assert b.x0.shape == (4, 3, 32, 32) and torch.equal(b.x0[:, 0], b.x0[:, 2])
    assert b.cond.class_labels is None and b.prompts[0].startswith("a photo of a ")
    assert ds.captions[0] == "a photo of a t-shirt" and ds.class_names[0] == "T-shirt/top"
    assert ds.sample_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="data.channels"):
        FashionMNIST(limit=8, channels=2)


# ---------------------------------------------------------------------------------------------- tiny t2i parts
@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """The text encoder and VAE of a tiny SD pipeline (16 px images, 4x8x8 latents)."""
    from diffdistill.models.latent import LatentCodec
    from diffdistill.models.text import PromptEncoder
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    path = tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe", kind="sd", image_size=16)
    return PromptEncoder.from_pretrained(path), LatentCodec.from_pretrained(path)


class FakeT2ITeacher(nn.Module):
    """What prepare_batch reads from a text-to-image teacher: its encoder, VAE and sample shape."""

    num_classes = None

    def __init__(self, encoder, codec):
        super().__init__()
        self.prompt_encoder, self.latent = encoder, codec
        self.sample_shape = (4, 8, 8)


def test_latents_round_trip(tmp_path, sd_parts):
    _, codec = sd_parts
    base = SyntheticImages(num=10, resolution=16, channels=3, num_classes=10)
    ds = CaptionedImages(base, "a photo of a {}", words=CLASSES)
    path = encode_latents(ds, codec, tmp_path / "lat.safetensors", batch_size=4, dtype="float32")
    lat = LatentDataset(str(path))
    with torch.no_grad():
        want = codec.encode(base.get(torch.arange(10)).x0)
    b = lat.get(torch.tensor([3, 0, 9]))
    torch.testing.assert_close(b.x0, want[[3, 0, 9]], rtol=1e-5, atol=1e-6)
    assert b.prompts == ds.get(torch.tensor([3, 0, 9])).prompts
    assert torch.equal(b.cond.class_labels, base.labels[[3, 0, 9]])
    assert lat.sample_shape == (4, 8, 8) and lat.image_shape == (3, 16, 16) and len(lat) == 10
    assert lat.scaling_factor == pytest.approx(codec.scaling_factor) and lat.class_names == CLASSES
    half = LatentDataset(str(encode_latents(ds, codec, tmp_path / "h.safetensors", batch_size=3)), keep_labels=False)
    assert half.latents.dtype == torch.float16 and half.get(torch.arange(2)).cond.class_labels is None
    torch.testing.assert_close(half.get(torch.arange(10)).x0, want.half().float())


def test_latent_dataset_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="encode_latents"):
        LatentDataset(str(tmp_path / "none.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a diffdistill latents file"):
        LatentDataset(str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        LatentDataset(str(tmp_path / "junk.safetensors"))


def test_prepare_batch_uses_the_teachers_encoder_and_vae(sd_parts):
    encoder, codec = sd_parts
    teacher = FakeT2ITeacher(encoder, codec)
    prompts = ["a red cube", "", "a red cube"]
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = prepare_batch(Batch(x, Conditioning(class_labels=torch.tensor([1, 2, 3])), prompts=prompts), teacher)
    ref = encoder.encode(prompts)
    assert torch.equal(out.cond.prompt_embeds, ref.prompt_embeds) and out.cond.class_labels is None
    with torch.no_grad():
        assert torch.equal(out.x0, codec.encode(x))
    assert out.prompts == prompts
    lat = torch.randn(3, 4, 8, 8)  # latents pass through untouched
    assert prepare_batch(Batch(lat, Conditioning(), prompts=prompts), teacher).x0 is lat
    free = prepare_batch(Batch(None, Conditioning(), prompts=prompts), teacher)
    assert free.x0 is None and free.batch_size == 3 and free.cond.prompt_embeds.shape[0] == 3
    with pytest.raises(ValueError, match="neither the teacher's latent shape"):
        prepare_batch(Batch(torch.zeros(2, 3, 12, 12)), teacher)
    # a data-free objective: the images are not encoded (no VAE call), the prompts still are
    calls = []
    hook = codec.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        unused = prepare_batch(Batch(x, Conditioning(), prompts=prompts), teacher, real_samples=False)
        assert unused.x0 is None and unused.batch_size == 3 and not calls
        assert torch.equal(unused.cond.prompt_embeds, ref.prompt_embeds)
        assert prepare_batch(Batch(lat, Conditioning(), prompts=prompts), teacher, real_samples=False).x0 is lat
        prepare_batch(Batch(x, Conditioning(), prompts=prompts), teacher)
        assert calls  # the same batch for an objective that reads x0: encoded
    finally:
        hook.remove()


def test_prepare_batch_without_a_text_encoder():
    class ClassTeacher(nn.Module):
        num_classes, sample_shape = 10, (3, 8, 8)

    teacher, labels = ClassTeacher(), torch.tensor([1, 2])
    b = Batch(torch.zeros(2, 3, 8, 8), Conditioning(class_labels=labels), prompts=["a", "b"])
    assert prepare_batch(b, teacher) is b  # labelled captions: the class teacher ignores the prompts
    with pytest.raises(ValueError, match="no text encoder"):
        prepare_batch(Batch(None, Conditioning(), prompts=["a", "b"]), teacher)


def test_check_data_matches_takes_pixels_for_a_latent_teacher(sd_parts):
    encoder, codec = sd_parts
    teacher = FakeT2ITeacher(encoder, codec)
    pixels = CaptionedImages(SyntheticImages(num=16, resolution=16, channels=3), "{}", words=CLASSES)
    check_data_matches(pixels, teacher, teacher, 8)
    with pytest.raises(ValueError, match=r"or images of shape \(3, 16, 16\)"):
        check_data_matches(SyntheticImages(num=16, resolution=8, channels=3), teacher, teacher, 8)

    class ClassTeacher(nn.Module):
        num_classes, sample_shape = None, (3, 16, 16)

    with pytest.raises(ValueError, match="serves prompts, but the teacher has no text encoder"):
        check_data_matches(pixels, ClassTeacher(), ClassTeacher(), 8)


# ---------------------------------------------------------------------------------------------- grids, evaluation
def test_prompt_grid_image_layout():
    from diffdistill.evaluation.plot import prompt_grid_image

    panels = [torch.rand(6, 3, 8, 8) * 2 - 1, torch.zeros(6, 3, 8, 8)]
    img = prompt_grid_image(panels, ["a very long prompt " * 6, "b", "c"], ["teacher", "student"], "title")
    assert img.width == 3 * 96 + 4 * 4
    white = prompt_grid_image(panels, ["a", "b", "c"], None, None)
    assert img.height > white.height  # headers and title
    with pytest.raises(ValueError, match="2 labels for 1 panels"):
        prompt_grid_image(panels[:1], ["a"], ["x", "y"])


class PromptGenerator(nn.Module):
    """A one-step 'generator' whose output encodes its prompt embedding (mean) and noise."""

    sampling_sigmas = [1.0]
    sample_shape = (4, 8, 8)
    num_classes = None

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, z, cond, sigma=None):
        return 0.1 * z + self.w * cond.prompt_embeds.mean((1, 2))[:, None, None, None]


def test_prompt_generation_is_independent_of_batch_size(sd_parts):
    from diffdistill.evaluation import Evaluator
    from diffdistill.evaluation.generation import generate, prompt_conditioning

    encoder, codec = sd_parts
    prompts = ["a red cube", "blue sky", "a dog"]
    cond_fn = prompt_conditioning(prompts, encoder)
    gen = PromptGenerator()
    a = generate(gen, 5, seed=1, batch_size=2, cond_fn=cond_fn, decode=codec.decode)
    b = generate(gen, 5, seed=1, batch_size=5, cond_fn=cond_fn, decode=codec.decode)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 1
    ref = encoder.encode([prompts[i % 3] for i in range(5)]).prompt_embeds
    torch.testing.assert_close(cond_fn(torch.arange(5)).prompt_embeds, ref)
    # the evaluator takes the encoder, VAE and captions from the teacher and the data (in-loop)
    ev = Evaluator(metrics=["clip_score"], clip="clip_x", num_images=5, batch_size=2, seed=1)
    ev.attach(FakeT2ITeacher(encoder, codec), CaptionedImages(SyntheticImages(num=16), "{}", words=CLASSES))
    assert ev.prompts == list(CLASSES) and ev.prompts_for(3) == ["class0", "class1", "class2"]
    imgs = ev.generate(gen)
    assert imgs.shape == (5, 3, 16, 16) and ev.last_sampler["latent_decoded"] and ev.last_sampler["prompts"]
    want = generate(gen, 5, seed=1, cond_fn=prompt_conditioning(list(CLASSES), encoder), decode=codec.decode)
    assert torch.equal(imgs, want)


def test_latents_command_encodes_the_data_group(tmp_path, sd_parts):
    """python -m diffdistill.data.latents PIPELINE OUT data=...: a latents file the data=latents group reads."""
    from diffdistill.data.latents import main
    from diffdistill.testing.tiny_t2i import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "pipe", kind="sd", image_size=8)
    data = ["data=synthetic", "data.num=6", "data.resolution=8", "data.channels=3"]
    out = main([str(pipe), str(tmp_path / "lat.safetensors"), *data, "--batch-size", "4"])
    lat = LatentDataset(str(out))
    assert len(lat) == 6 and lat.sample_shape == (4, 4, 4) and lat.prompts is None and lat.num_classes == 10
