"""The copy task of Kerg et al. (2020), trained with RelRNN on the fused CPU kernels.

Input, length T + 2K (K = 8 symbols to remember):
    K symbols drawn from {1..8} | T - 1 blanks (0) | the delimiter (9) | K blanks
Target: blanks for the first T + K steps, then the K symbols in order. A model without memory
can do no better than the loss K log(8) / (T + 2K) (predict blanks, then guess); the accuracy
printed is over the K recalled symbols only (chance: 1/8).

Usage (CPU; threads as OMP_NUM_THREADS / torch's default, or --threads)::

    python examples/copy_task.py --T 100 --steps 2000 --batch 64
    python examples/copy_task.py --T 200 --backend reference   # the same, on the slow reference

Training stops early once the recall accuracy of a fresh evaluation batch reaches --stop-at.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from screening_attn.nn import RelRNN

K = 8  # symbols to remember
N_SYMBOLS = 8  # alphabet 1..8; 0 is the blank, 9 the delimiter
N_IN, N_OUT = 10, 9  # one-hot inputs: blank, symbols, delimiter; outputs: blank and symbols


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100, help="delay (blanks between input and recall)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (max)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--relevant", type=int, default=10)
    p.add_argument(
        "--nonlinearity", default="modrelu", choices=["tanh", "modrelu", "relu", "identity"]
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "reference", "auto"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--stop-at", type=float, default=0.99, help="recall accuracy to stop at")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def batch(T: int, B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T + 2K, B, 10) one-hot, y (T + 2K, B) class indices."""
    L = T + 2 * K
    symbols = torch.randint(1, N_SYMBOLS + 1, (K, B), generator=gen)
    seq = torch.zeros(L, B, dtype=torch.long)
    seq[:K] = symbols
    seq[T + K - 1] = N_SYMBOLS + 1  # the delimiter
    y = torch.zeros(L, B, dtype=torch.long)
    y[T + K :] = symbols
    return nn.functional.one_hot(seq, N_IN).float(), y


class CopyModel(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.rnn = RelRNN(N_IN, args.hidden, args.window, args.relevant, args.nonlinearity)
        self.lin = nn.Linear(args.hidden, N_OUT)  # the paper's names: rnn.*, lin.*
        self.backend = args.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x, backend=self.backend)
        return self.lin(h)  # (L, B, 9)


def recall_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits[-K:].argmax(-1) == y[-K:]).float().mean().item()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = CopyModel(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    baseline = K * math.log(N_SYMBOLS) / (args.T + 2 * K)
    print(
        f"copy task T={args.T} (length {args.T + 2 * K}), batch {args.batch}, RelRNN "
        f"hidden={args.hidden} window={args.window} relevant={args.relevant} "
        f"{args.nonlinearity}, backend={args.backend}, {torch.get_num_threads()} threads; "
        f"memoryless baseline loss {baseline:.4f}"
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(args.T, args.batch, gen)
        logits = model(x)
        loss = loss_fn(logits.reshape(-1, N_OUT), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                xe, ye = batch(args.T, args.eval_batch, gen)
                le = model(xe)
                eval_loss = loss_fn(le.reshape(-1, N_OUT), ye.reshape(-1)).item()
                acc = recall_accuracy(le, ye)
            print(
                f"step {step:5d}  {time.perf_counter() - start:7.1f} s  train loss "
                f"{loss.item():.4f}  eval loss {eval_loss:.4f}  recall accuracy {acc:.3f}",
                flush=True,
            )
            if acc >= args.stop_at:
                print(f"reached recall accuracy {acc:.3f} >= {args.stop_at} at step {step}")
                break


if __name__ == "__main__":
    main()
