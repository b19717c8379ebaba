"""``diffdistill-export`` on real runs: every registered objective trains two iterations on the tiny UNet, is
exported from its run folder, loaded by a fresh process with ``from_pretrained`` and compared with
``diffdistill.load_generator`` + diffdistill's own sampler (same seeds and labels; see
``tests/unit/test_export_pipeline.py`` for the seeding convention). Bad input gets one clear error.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import diffdistill
from diffdistill.cli.common import compose_config
from diffdistill.cli.train import run as train
from diffdistill.models.conditioning import Conditioning
from diffdistill.objectives import OBJECTIVES
from tests.export_runner import run_in_fresh_process
from tests.helpers import TINY, compose_train

NAMES = sorted(OBJECTIVES)
VARIANTS = {name: [f"objective={name}"] for name in NAMES}
# LCM-LoRA: a LoRA student without guidance embedding (the stock pipeline), exported as base + peft adapter
VARIANTS["lcm_lora"] = ["objective=lcm", "objective.embed_guidance=false", "student.lora={rank:2}"]
EXPORT_OPTS = {"lcm_lora": ["lora=adapters"]}
B, LABELS, RECIPE = 2, [3, 7], [80.0, 0.8]


def _train(name: str, run_dir) -> None:
    base = [*TINY, *VARIANTS[name], f"run_dir={run_dir}", "trainer.max_steps=2", "trainer.sample_every=0"]
    base += [f"student.sampling_sigmas={RECIPE}", "trainer.ema_decays=[0.9,0.999]", "optim.warmup_steps=0"]
    if compose_train(base).objective.get("distance") == "lpips":  # LPIPS weights are never downloaded
        base.append("objective.distance=l2")
    train(compose_train(base))


def export_cli(*overrides: str):
    from diffdistill.cli.export import run

    return run(compose_config(list(overrides), config_name="export"))


def _reference(gen, seed: int, steps: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((B, *gen.sample_shape), generator=g)
    cond = Conditioning(class_labels=torch.tensor(LABELS))
    with torch.no_grad():
        return gen(z, cond) if steps == "one" else gen.sample(z, cond, generator=g)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (run folder, export result or the exception), and the fresh process's samples of every export."""
    root = tmp_path_factory.mktemp("export_runs")
    done, jobs = {}, []
    for name in VARIANTS:
        try:
            _train(name, root / name)
            res = export_cli(f"source={root / name}", f"out={root / 'exports' / name}", *EXPORT_OPTS.get(name, []))
        except Exception as e:  # noqa: BLE001 - reported by the objective's own test
            done[name] = (root / name, e)
            continue
        done[name] = (root / name, res)
        calls = [
            {"tag": "one", "seed": 5, "kwargs": {"batch_size": B, "class_labels": LABELS, "num_inference_steps": 1}},
            {"tag": "recipe", "seed": 6, "kwargs": {"batch_size": B, "class_labels": LABELS}, "recipe": True},
        ]
        adapter = str(res.path / "lora") if name in EXPORT_OPTS else None
        jobs.append({"name": name, "folder": str(res.path), "pipeline": res.kind, "adapter": adapter, "calls": calls})
    fresh = run_in_fresh_process(jobs, root) if jobs else {"jobs": {}}
    return done, fresh


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_objective_exports_and_reloads_in_a_fresh_process(runs, name):
    done, fresh = runs
    run_dir, res = done[name]
    if isinstance(res, Exception):
        raise res
    gen = diffdistill.load_generator(run_dir)  # EMA auto: the highest decay, as the export
    assert res.kind == ("stock" if name in ("cd", "ict", "lcm_lora") else "diffdistill"), res.reason
    for tag, seed in (("one", 5), ("recipe", 6)):
        got, want = fresh["jobs"][name][tag]["raw"], _reference(gen, seed, tag)
        assert (got - want).abs().max().item() <= 1e-5, (name, tag)
    objective = OBJECTIVES[VARIANTS[name][0].split("=")[1]]
    card = (res.path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and objective.name in front["tags"]
    assert f"arXiv:{objective.paper.arxiv}" in card and "Training iterations: 2" in card
    assert fresh["training_imported"] == []


def test_ema_track_selection(runs, tmp_path):
    """``ema=auto`` exports the highest-decay track, ``ema=0.9`` that track, ``ema=null`` the online weights; a model
    folder exports itself."""
    from safetensors.torch import load_file

    run_dir, _ = runs[0]["dmd"]
    states = {}
    for ema, key in (("auto", 0.999), ("0.9", 0.9), ("null", None)):
        res = export_cli(f"source={run_dir}", f"out={tmp_path / str(ema)}", f"ema={ema}", "verify=false")
        exported = load_file(str(res.path / "student" / "diffusion_pytorch_model.safetensors"))
        want = diffdistill.load_generator(run_dir, ema=key).denoiser.state_dict()
        assert all(torch.equal(exported[f"generator.denoiser.{k}"], v) for k, v in want.items())
        states[ema] = exported
        assert json.loads((res.path / "diffdistill.json").read_text())["source_metadata"]["ema_decay"] == key
    # a generator model folder (here one EMA track of a checkpoint) is a source too
    folder = next((run_dir / "checkpoints").glob("step*")) / "ema_0.9"
    res = export_cli(f"source={folder}", f"out={tmp_path / 'folder'}", "verify=false")
    exported = load_file(str(res.path / "student" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in states["0.9"].items())
    k = next(k for k in states["auto"] if k.endswith("conv_out.weight"))
    assert not torch.equal(states["auto"][k], states["0.9"][k]) and not torch.equal(states["0.9"][k], states["null"][k])


def test_eval_results_are_copied_and_summarised(runs, tmp_path):
    run_dir, _ = runs[0]["cd"]
    results = {
        "format": "diffdistill-eval/1",
        "protocol": {"metrics": ["fid"], "num_images": 64, "seed_range": [0, 64], "extractor": {"extractor": "x"}},
        "results": [{"step": 2, "ema": "0.999", "sampler_steps": 1, "fid": 123.456, "checkpoint": "c"}],
    }
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "x.json").write_text(json.dumps(results))
    try:
        res = export_cli(f"source={run_dir / 'checkpoints' / 'last'}", f"out={tmp_path / 'e'}", "verify=false")
    finally:
        (run_dir / "eval" / "x.json").unlink()
    assert json.loads((res.path / "eval" / "x.json").read_text()) == results
    card = (res.path / "README.md").read_text()
    assert "## Metrics" in card and "123.5" in card and "`num_images`: 64" in card


def test_bad_input_gets_one_clear_error(runs, tmp_path):
    run_dir, _ = runs[0]["dmd"]
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        export_cli(f"source={tmp_path / 'notes.txt'}", f"out={tmp_path / 'a'}")
    (tmp_path / "old.pt").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="another format"):
        export_cli(f"source={tmp_path / 'old.pt'}", f"out={tmp_path / 'a'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        export_cli(f"source={tmp_path / 'empty'}", f"out={tmp_path / 'a'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_cli(f"source={tmp_path / 'missing'}", f"out={tmp_path / 'a'}")
    with pytest.raises(ValueError, match="EMA tracks"):
        export_cli(f"source={run_dir}", f"out={tmp_path / 'a'}", "ema=0.5")
    with pytest.raises(ValueError, match="give source"):
        export_cli(f"out={tmp_path / 'a'}")
    assert not (tmp_path / "a").exists()
    # a non-empty target is refused (and left alone) unless overwrite=true
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "-m", "diffdistill.cli.export", f"source={run_dir}", f"out={tmp_path / 'b'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("diffdistill: error:"), proc.stderr
    assert "overwrite=true" in lines[0] and (tmp_path / "b" / "keep.txt").read_text() == "mine"
    export_cli(f"source={run_dir}", f"out={tmp_path / 'b'}", "overwrite=true", "verify=false")
    assert not (tmp_path / "b" / "keep.txt").exists() and (tmp_path / "b" / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_a_failed_export_writes_nothing(runs, tmp_path, monkeypatch):
    import diffdistill.export.exporter as ex

    run_dir, _ = runs[0]["dmd"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_verify", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_cli(f"source={run_dir}", f"out={tmp_path / 'x'}")
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_the_folder(runs, tmp_path, monkeypatch, no_network):
    import huggingface_hub

    run_dir, _ = runs[0]["cd"]
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw["repo_id"], kw)))
    res = export_cli(f"source={run_dir}", f"out={tmp_path / 'hub'}", "push_to_hub=me/tiny-cd", "verify=false")
    assert [c[:2] for c in calls] == [("create", "me/tiny-cd"), ("upload", "me/tiny-cd")]
    assert calls[1][2]["folder_path"] == str(res.path) and calls[0][2]["exist_ok"] is True
    card = (res.path / "README.md").read_text()  # the card loads the uploaded repository (a mocked hub id)
    assert "ConsistencyModelPipeline.from_pretrained(" + '"me/tiny-cd")' in card
