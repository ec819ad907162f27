"""The copy task of Kerg et al. (2020): train one model (RelRNN, RelLSTM or nn.LSTM) on the fused
CPU kernels.

The task, the models and the training loop are those of the quality benchmark
(``bench/quality/copy_task.py``, run by ``make quality``, which compares the three models at
T = 100, 200, 500). Input, length T + 2K (K = 8 symbols to remember):
    K symbols drawn from {1..8} | T - 1 blanks (0) | the delimiter (9) | K blanks
Target: blanks for the first T + K steps, then the K symbols in order; the accuracy printed is
over the K recalled symbols only (chance: 1/8).

Usage (CPU; threads as OMP_NUM_THREADS / torch's default, or --threads)::

    python examples/copy_task.py --T 100 --steps 2000
    python examples/copy_task.py --T 200 --model rellstm
    python examples/copy_task.py --T 100 --backend reference   # the same, on the slow reference

Training stops early once the recall accuracy of a held-out batch reaches --stop-at.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's bench package

from bench.quality import copy_task


def parse_args() -> argparse.Namespace:
    d = copy_task.DEFAULT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100, help="delay (blanks between input and recall)")
    p.add_argument("--model", default="relrnn", choices=copy_task.MODELS)
    p.add_argument("--steps", type=int, default=2000, help="training steps (max)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--relevant", type=int, default=d.relevant)
    p.add_argument(
        "--nonlinearity",
        default=d.nonlinearity,
        choices=["tanh", "modrelu", "relu", "identity"],
        help="RelRNN's",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clipping (0: off)")
    p.add_argument("--backend", default="auto", choices=["cpu", "reference", "auto"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=d.eval_batch)
    p.add_argument("--stop-at", type=float, default=0.99, help="recall accuracy to stop at")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(
        copy_task.DEFAULT,
        hidden=args.hidden,
        window=args.window,
        relevant=args.relevant,
        nonlinearity=args.nonlinearity,
        steps=args.steps,
        steps_by_delay=(),
        batch=args.batch,
        lr=args.lr,
        clip=args.clip,
        eval_batch=args.eval_batch,
        log_every=args.log_every,
    )
    print(
        f"copy task T={args.T} (length {args.T + 2 * copy_task.K}), batch {args.batch}, "
        f"{args.model} hidden={args.hidden} window={args.window} relevant={args.relevant}, "
        f"backend={args.backend}, {torch.get_num_threads()} threads; memoryless baseline loss "
        f"{copy_task.memoryless_loss(args.T):.4f}"
    )
    result = copy_task.train(
        args.model, args.T, args.seed, cfg, print, backend=args.backend, stop_at=args.stop_at
    )
    step = result["curve"][-1]["step"]
    verdict = "reached" if result["acc"] >= args.stop_at else "did not reach"
    print(
        f"{verdict} recall accuracy {args.stop_at} (last: {result['acc']:.3f} at step {step}, "
        f"{result['train_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
