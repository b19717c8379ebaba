"""Fresh-process side of the export tests: load exported pipelines with ``from_pretrained`` and sample them.

Run as ``python tests/export_runner.py spec.json``. The spec lists jobs ``{name, folder, pipeline ("stock" |
"diffdistill"), adapter (a peft folder or null), calls: [{tag, seed, kwargs, recipe}], snippet}``; the results
(``{name: {tag: {"raw", "pt"}}}``, the output types and whether training code was imported) are saved with
``torch.save`` to ``spec["out"]``. Sockets are refused: nothing may reach the network.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path


def _refuse(*args, **kwargs):
    raise OSError("network access attempted while loading an exported pipeline")


def _load(job: dict):
    import torch  # noqa: F401

    if job["pipeline"] == "stock":
        from diffusers import ConsistencyModelPipeline

        pipe = ConsistencyModelPipeline.from_pretrained(job["folder"])
        if job.get("adapter"):
            from peft import PeftModel

            pipe.unet = PeftModel.from_pretrained(pipe.unet, job["adapter"]).merge_and_unload()
    else:
        from diffdistill.export import DiffDistillPipeline

        pipe = DiffDistillPipeline.from_pretrained(job["folder"])
        if job.get("adapter"):
            pipe.load_lora(job["adapter"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, job: dict, call: dict) -> dict:
    import torch

    kwargs = dict(call.get("kwargs") or {})
    if job["pipeline"] == "stock" and call.get("recipe"):  # the few-step call recorded in the scheduler config
        kwargs.update(pipe.scheduler.config["_diffdistill_recipe"]["call"])
    out = {}
    g = torch.Generator().manual_seed(call["seed"])
    if job["pipeline"] == "stock":
        raw = []
        pt = pipe(generator=g, output_type="pt", callback=lambda i, t, x: raw.append(x.clone()), **kwargs).images
        out["raw"] = raw[-1]
    else:
        out["raw"] = pipe(generator=g, output_type="latent", **kwargs).images
        g = torch.Generator().manual_seed(call["seed"])
        pt = pipe(generator=g, output_type="pt", **kwargs).images
    out["pt"] = pt
    if call.get("formats"):
        g = torch.Generator().manual_seed(call["seed"])
        out["np_shape"] = list(pipe(generator=g, output_type="np", **kwargs).images.shape)
        g = torch.Generator().manual_seed(call["seed"])
        pil = pipe(generator=g, output_type="pil", **kwargs).images
        out["pil"] = [type(pil[0]).__name__, list(pil[0].size), pil[0].mode, len(pil)]
    return out


def _snippet(folder: str) -> int:
    """Run the Python block of the folder's README.md; returns the number of images it made."""
    text = (Path(folder) / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, f"{folder}/README.md", "exec"), ns)
    return len(ns["images"])


def run_in_fresh_process(jobs: list[dict], workdir: Path) -> dict:
    """Run ``jobs`` in a new Python process (cwd ``workdir``, offline) and return its results."""
    import os
    import subprocess

    import torch

    spec = {"out": str(workdir / "fresh_results.pt"), "jobs": jobs}
    (workdir / "fresh_spec.json").write_text(json.dumps(spec))
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(workdir / "fresh_spec.json")],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(spec["out"], weights_only=False)


def main(spec_path: str) -> None:
    import torch

    socket.socket.connect = _refuse  # type: ignore[method-assign]
    socket.create_connection = _refuse  # type: ignore[assignment]

    spec = json.loads(Path(spec_path).read_text())
    results: dict = {"jobs": {}}
    for job in spec["jobs"]:
        pipe = _load(job)
        res = {call["tag"]: _call(pipe, job, call) for call in job["calls"]}
        if job.get("snippet"):
            res["snippet_images"] = _snippet(job["folder"])
        results["jobs"][job["name"]] = res
    results["training_imported"] = sorted(
        m for m in sys.modules if m.startswith(("diffdistill.objectives", "diffdistill.training"))
    )
    torch.save(results, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
