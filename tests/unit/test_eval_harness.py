"""Evaluator end to end (random CNN), reference-statistics cache, results JSON + plot, diffdistill-eval CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdistill.data import ImageTensorDataset
from diffdistill.evaluation import Evaluator, generate, plot_results, read_results, reference_stats, write_results
from diffdistill.evaluation.extractors import build_extractor
from diffdistill.models import GaussianDenoiser, Generator

SHAPE = (1, 16, 16)


def _gen(mean: float = 0.0, std: float = 0.5) -> Generator:
    return Generator(GaussianDenoiser(torch.full(SHAPE, mean), torch.full(SHAPE, std)), sigma_init=1.0)


def _reference(n: int = 96, name: str = "toy-test-16") -> ImageTensorDataset:
    """Real images drawn from the same distribution as ``_gen()``'s samples (different seeds)."""
    imgs = generate(_gen(), n, seed=10_000, batch_size=n)
    return ImageTensorDataset(imgs, name=name)


def _evaluator(ref, **kw) -> Evaluator:
    args = dict(
        extractor="random_cnn",
        reference=ref,
        num_images=64,
        metrics=["fid", "kid", "precision_recall"],
        batch_size=32,
        extractor_kwargs={"input_size": 16, "feature_dim": 16},
        kid_subsets=10,
        kid_subset_size=64,
    )
    return Evaluator(**{**args, **kw})


def test_evaluator_scores_and_ranks(no_network):
    ref = _reference()
    ev = _evaluator(ref)
    good, bad = ev(_gen(), step=1), ev(_gen(mean=0.6, std=0.2), step=2)
    assert set(good) == {"fid", "kid", "precision", "recall"}
    assert bad["fid"] > 3 * good["fid"] and bad["kid"] > good["kid"]
    assert good["recall"] > bad["recall"]
    again = _evaluator(ref, batch_size=17)(_gen())  # batch size does not change any number
    assert again == pytest.approx(good, rel=1e-6)
    p = ev.protocol()
    assert p["num_images"] == 64 and p["seed_range"] == [0, 63]
    assert p["extractor"]["extractor"].startswith("random_cnn") and p["sampler"]["sampler"] == "one_step"
    assert p["reference"]["dataset"] == "toy-test-16" and p["reference"]["split"] == "test"


def test_reference_stats_cached_by_key(tmp_path):
    ref = _reference(40)
    ex = build_extractor("random_cnn", input_size=16, feature_dim=16)
    s1 = reference_stats(ref, ex, cache_root=tmp_path)
    assert s1.path is not None and s1.path.is_file() and "toy-test-16" in s1.path.name and ex.id in s1.path.name
    assert s1.meta["extractor"] == ex.id and s1.meta["num_images"] == 40
    s1.path.write_bytes(s1.path.read_bytes())  # still loadable
    s2 = reference_stats(ref, ex, cache_root=tmp_path)
    assert np.array_equal(s1.mu, s2.mu) and s2.path == s1.path
    other = build_extractor("random_cnn", seed=1, input_size=16, feature_dim=16)
    assert reference_stats(ref, other, cache_root=tmp_path).path != s1.path
    sub = reference_stats(ref, ex, num_images=20, cache_root=tmp_path)
    assert sub.num_images == 20 and sub.path != s1.path
    assert np.allclose(s1.mu, np.mean(ex.extract(ref.images), axis=0), atol=1e-6)


def test_results_json_and_plot(tmp_path):
    ev = _evaluator(_reference())
    out = tmp_path / "res.json"
    for step, mean in ((100, 0.5), (200, 0.2), (300, 0.0)):
        write_results(
            out, ev.protocol(), [ev.record(ev(_gen(mean=mean), step), step=step, checkpoint=f"s{step}.pt", ema="0.999")]
        )
    doc = read_results(out)
    assert [r["step"] for r in doc["results"]] == [100, 200, 300]
    assert doc["protocol"]["extractor"]["weights_sha256"] is None and doc["results"][0]["ema"] == "0.999"
    # re-writing the same (checkpoint, ema, step) replaces the row
    write_results(out, ev.protocol(), [{**doc["results"][0], "fid": -1.0}])
    assert len(read_results(out)["results"]) == 3
    other = _evaluator(_reference(), num_images=32)
    other(_gen())
    with pytest.raises(ValueError, match="different evaluation protocol"):
        write_results(out, other.protocol(), [])
    write_results(out, ev.protocol(), [ev.record(ev(_gen()), checkpoint="teacher", kind="teacher")])  # no step
    png = plot_results(out)
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metrics"):
        Evaluator(extractor="random_cnn", reference=_reference(8), metrics=["is"])
    with pytest.raises(ValueError, match="need a reference"):
        Evaluator(extractor="random_cnn", reference=None, metrics=["fid"])
    with pytest.raises(ValueError, match="need `clip`"):
        Evaluator(reference=_reference(8), metrics=["clip_score"])


# ------------------------------------------------------------------------------------------- CLI
def test_every_eval_config_composes():
    from diffdistill.cli.common import CONFIG_DIR
    from diffdistill.cli.evaluate import compose

    names = sorted(p.stem for p in (__import__("pathlib").Path(CONFIG_DIR) / "eval").glob("*.yaml"))
    assert {"effnet_fid", "random_cnn", "none"} <= set(names)
    for name in names:
        text = (__import__("pathlib").Path(CONFIG_DIR) / "eval" / f"{name}.yaml").read_text()
        first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        assert first.startswith("_target_:"), name
        cfg = compose([f"eval={name}"])
        assert cfg.eval._target_


def test_cli_run_dir(tmp_path, monkeypatch, no_network):
    import diffdistill.cli.evaluate as cli
    from diffdistill.evaluation import save_images

    real = save_images(_reference(64).images, tmp_path / "real")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    means = {10: 0.6, 20: 0.3, 30: 0.0}
    for s in means:
        (run / "checkpoints" / f"step{s:07d}").mkdir()
        (run / "checkpoints" / f"step{s:07d}" / "trainer_state.pt").write_bytes(b"")
    loaded = []

    def fake_load_generator(path, ema="auto"):
        loaded.append((path, ema))
        return _gen(mean=means[cli.checkpoint_step(path)])

    import diffdistill.models.io

    monkeypatch.setattr(diffdistill.models.io, "load_generator", fake_load_generator)
    from omegaconf import OmegaConf

    cfg = cli.compose(["eval=random_cnn", f"run_dir={run}", "ema=null", "eval.num_images=48"])
    OmegaConf.update(
        cfg,
        "eval.reference",
        {"_target_": "diffdistill.data.ImageFolder", "root": str(real), "resolution": 16, "channels": 1},
        merge=False,
    )
    out = cli.evaluate(cfg)
    assert out == run / "eval" / f"{build_extractor('random_cnn', seed=0, input_size=32, feature_dim=32).id}.json"
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [r["step"] for r in rows] == [10, 20, 30] and all(r["ema"] is None for r in rows)
    assert rows[0]["fid"] > rows[-1]["fid"]
    assert doc["protocol"]["num_images"] == 48 and doc["protocol"]["seed_range"] == [0, 47]
    assert out.with_suffix(".png").is_file()
    n = len(loaded)
    cli.evaluate(cfg)  # everything already evaluated: skipped
    assert len(loaded) == n


def test_in_loop_results_path(tmp_path):
    out = tmp_path / "eval" / "inloop.json"
    ev = _evaluator(_reference(), results_path=str(out), num_images=32)
    assert ev.device is None  # follows the model
    gen = _gen().train()
    for step in (5, 10):
        ev(gen, step)
    assert gen.training and str(ev.device) == "cpu"
    rows = read_results(out)["results"]
    assert [r["step"] for r in rows] == [5, 10] and all("fid" in r and r["kind"] == "in-loop" for r in rows)
