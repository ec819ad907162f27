"""Data-parallel training with DistributedDataParallel of a model that uses screened attention,
a RelLSTM and a CNN-F block.

Each process holds a replica, trains on its share of every batch (``DistributedSampler``) and
DDP averages the gradients, so the replicas stay identical (checked at the end). The synthetic
task: a label in ``{0..classes-1}`` is written into the first step of a noisy sequence (far
outside the attention windows: the relevant sets or the LSTM cell must carry it) and into a
noisy image as a class template; the sequence branch (screened attention, RelLSTM) and the image
branch (CNN-F, ``run_cycles``) add their logits. The image alone makes the task easy: the point
is the mechanics of distributed training, not the task.

The CNN-F block is a module whose ``forward`` calls ``run_cycles``: DDP synchronises gradients
only for a backward through its own ``forward``, so every use of the CNN-F weights (the bottom-up
passes and the transposed top-down ones) must happen inside one call of it
(tests/test_distributed.py shows what goes wrong otherwise).

Run (CPU: gloo; with CUDA: nccl, one GPU per process, nothing else changes)::

    torchrun --nproc_per_node=2 examples/ddp_train.py
    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 10 --seq-len 256
    OMP_NUM_THREADS=1 python examples/ddp_train.py   # one process, same code

torchrun sets ``OMP_NUM_THREADS=1`` per process unless it is set already.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import screening_attn
from screening_attn import feedback as fb
from screening_attn.nn import RelLSTM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=1024, help="training set size")
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--image", type=int, default=16, help="image side (even)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Attention(nn.Module):
    """Multi-head self-attention through ``screened_attention`` (causal, window + relevant)."""

    def __init__(self, dim: int, heads: int, window: int, relevant: int) -> None:
        super().__init__()
        self.heads, self.window, self.relevant = heads, window, relevant
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = screening_attn.screened_attention(q, k, v, self.window, self.relevant)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedbackBlock(nn.Module):
    """A small CNN-F whose ``forward`` runs the whole feedback inference (see the module doc)."""

    def __init__(self, image: int, classes: int) -> None:
        super().__init__()
        self.net = fb.FeedbackNetwork(
            fb.FeedbackConv2d(1, 8, 3, padding=1),
            fb.InsNorm(),
            fb.Bias(8),
            fb.AdaReLU(0.1),
            fb.AdaPool2d(2),
            fb.Flatten(),
            fb.FeedbackLinear(8 * (image // 2) ** 2, classes),
            fb.Bias(classes),
            cycles=2,
            res_param=0.1,
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.net.run_cycles(image)


class Model(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.attn = Attention(args.features, heads=2, window=8, relevant=4)
        self.lstm = RelLSTM(args.features, 32, window=4, relevant=4)
        self.head = nn.Linear(32, args.classes)
        self.cnnf = FeedbackBlock(args.image, args.classes)

    def forward(self, seq: Tensor, image: Tensor) -> Tensor:
        """``seq (B, T, features)``, ``image (B, 1, S, S)`` -> logits ``(B, classes)``."""
        x = seq + self.attn(seq)
        h, _ = self.lstm(x.transpose(0, 1))  # RelLSTM takes (T, B, features)
        return self.head(h[-1]) + self.cnnf(image)


def make_data(args: argparse.Namespace, n: int, seed: int) -> TensorDataset:
    """``n`` samples of the task in the module doc, drawn with ``seed`` (the same in every
    process); the class templates are the task's, the same for every ``seed``."""
    templates = torch.randn(
        args.classes, 1, args.image, args.image, generator=torch.Generator().manual_seed(args.seed)
    )
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, args.classes, (n,), generator=gen)
    seq = torch.randn(n, args.seq_len, args.features, generator=gen)
    seq[torch.arange(n), 0, label] += 3.0
    image = 0.5 * templates[label] + torch.randn(n, 1, args.image, args.image, generator=gen)
    return TensorDataset(seq, image, label)


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the process group torchrun describes (or a world of one without torchrun)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def replicas_identical(model: nn.Module) -> bool:
    """Whether every process holds the same parameters (elementwise max == min over ranks)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def main() -> None:
    args = parse_args()
    device = init_distributed(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # DDP broadcasts rank 0's initial parameters anyway
    model = DistributedDataParallel(
        Model(args).to(device), device_ids=[device.index] if device.type == "cuda" else None
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train = make_data(args, args.samples, args.seed + 1)
    test = make_data(args, 512, args.seed + 2)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True)
    if rank == 0:
        print(
            f"{world} process(es), {dist.get_backend()} on {device.type}, "
            f"{torch.get_num_threads()} thread(s) each; {len(loader)} steps per epoch of "
            f"{args.batch} x {world} samples; T={args.seq_len}",
            flush=True,
        )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        total = torch.zeros(2, device=device)  # loss sum, samples
        for seq, image, label in loader:
            seq, image, label = seq.to(device), image.to(device), label.to(device)
            loss = F.cross_entropy(model(seq, image), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the processes here
            opt.step()
            total[0] += loss.detach() * len(label)
            total[1] += len(label)
        dist.all_reduce(total)
        if rank == 0:
            print(
                f"epoch {epoch + 1}  {time.perf_counter() - start:6.1f} s  "
                f"train loss {total[0].item() / total[1].item():.4f}",
                flush=True,
            )
    # Test accuracy: each process scores its share, the counts are summed.
    counts = torch.zeros(2, device=device)  # correct, samples
    test_sampler = DistributedSampler(test, num_replicas=world, rank=rank, shuffle=False)
    with torch.no_grad():
        for seq, image, label in DataLoader(test, batch_size=128, sampler=test_sampler):
            logits = model(seq.to(device), image.to(device))
            counts += torch.tensor(
                [(logits.argmax(1) == label.to(device)).sum().item(), len(label)], device=device
            )
    dist.all_reduce(counts)
    identical = replicas_identical(model.module)
    if rank == 0:
        print(
            f"test accuracy {counts[0].item() / counts[1].item():.3f} "
            f"(chance {1 / args.classes:.3f}); replicas identical: {identical}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
