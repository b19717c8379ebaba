"""Run by tests/integration/test_multiprocess.py under ``torchrun --nproc_per_node 2`` (gloo on CPU).

Trains each objective named on the command line for a few iterations on the tiny config, two processes at
batch B, and writes every process's final trainable weights to ``<out>/<name>.rank<r>.pt``. ``--no-sync``
disables the gradient averaging (the negative control).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--eval", action="store_true", help="also score a fixed generator with the evaluator")
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import diffdistill.training.trainer as trainer_module
    from diffdistill.training.builders import build_trainer
    from tests.helpers import compose_train
    from tests.integration.test_multiprocess import overrides

    if args.no_sync:
        trainer_module.average_gradients = lambda params: None
    for name in args.names:
        cfg = compose_train(overrides(name, Path(args.out) / f"run_{name}", args.steps, args.batch, accumulation=1))
        trainer = build_trainer(cfg)
        assert trainer.world_size == 2, trainer.world_size
        trainer.fit()
        weights = {r: [p.detach().clone() for p in trainer.roles[r].parameters()] for r in trainer.objective.roles}
        out = Path(args.out) / f"{name}.rank{trainer.rank}.pt"
        torch.save({"weights": weights, "world_size": trainer.world_size}, out)
    if args.eval:  # each process generates its share of the per-sample seeds; the evaluator gathers them
        import torch.distributed as dist

        from tests.unit.test_eval_harness import _evaluator, _gen, _reference

        ev = _evaluator(_reference(64))
        images = ev.generate(_gen())
        score = ev(_gen())
        torch.save({"images": images, "score": score}, Path(args.out) / f"eval.rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
