"""The ops and modules under torch.distributed: two processes (gloo, CPU) train a small float64
model that uses screened attention, a RelLSTM and a CNN-F block, under DistributedDataParallel
and under FSDP2's ``fully_shard``; the parameters must end equal (1e-10) to those of one process
training on the whole batch.

Why the CNN-F block is a wrapper whose ``forward`` calls ``run_cycles`` (``FeedbackBlock``):
``run_cycles`` runs the network's ``forward`` ``cycles + 1`` times and its ``feedback`` (the same
weights, transposed) ``cycles`` times per step. Both wrappers see only calls of a wrapped
module's ``forward``:

* DDP arms its gradient reducer in ``DistributedDataParallel.forward``; a backward through a graph
  built outside it (``ddp.module.cnnf.net.run_cycles(x)``) leaves every rank with its own
  gradients, silently (``test_ddp_needs_one_forward_per_step`` shows it). Through the wrapper
  there is one DDP forward per step. The repeated uses of a weight inside it are one parameter
  used several times in one graph, like an RNN's: autograd sums them before the parameter's
  gradient-accumulation hook fires, once per backward, and that hook is all DDP's reducer waits
  for. So neither ``static_graph`` nor ``find_unused_parameters`` is needed (every parameter is
  used every step).
* FSDP2 all-gathers a unit's parameters in a pre-forward hook and frees them after the forward
  (``reshard_after_forward``); outside it the parameters are sharded DTensors and ``run_cycles``
  raises (``test_fsdp2_needs_one_forward_per_step``). The wrapper makes the whole of
  ``run_cycles`` one forward of one FSDP unit.

The layers' gate state (``AdaReLU.hidden``, ``AdaPool2d``'s positions) is plain attributes, not
buffers: DDP does not broadcast it, and ``run_cycles`` resets it first, so each step's graph is
its own. Nothing in the model mixes samples (the CNN-F norm is per instance, attention and
RelLSTM per row), so the mean loss of the whole batch is the mean of the ranks' equal shards'
mean losses, which is what both wrappers' averaged gradients compute.
"""

from __future__ import annotations

import datetime
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import screening_attn
from screening_attn import feedback as fb
from screening_attn.nn import RelLSTM

WORLD = 2
BATCH = 8  # the whole batch; each rank trains on BATCH // WORLD samples
STEPS = 3
T, IN, HEADS, HEAD_DIM, HIDDEN, CLASSES = 16, 5, 2, 4, 6, 3
WINDOW, RELEVANT = 4, 3  # T > WINDOW + RELEVANT: keys are screened out
IMAGE = 8
LR, MOMENTUM = 0.2, 0.9
TOL = 1e-10
PG_TIMEOUT = datetime.timedelta(seconds=60)  # every collective of a rank fails after this
JOIN_TIMEOUT = 240.0  # seconds; the parent kills the children after this and fails


class Attention(nn.Module):
    """Self-attention over a sequence through ``screened_attention`` (the C++ CPU kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(IN, 3 * HEADS * HEAD_DIM)
        self.out = nn.Linear(HEADS * HEAD_DIM, IN)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, IN) -> (B, T, IN)``."""
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, T, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        y = screening_attn.screened_attention(q, k, v, WINDOW, RELEVANT)
        return self.out(y.transpose(1, 2).reshape(b, T, HEADS * HEAD_DIM))


class FeedbackBlock(nn.Module):
    """A CNN-F whose ``forward`` is the whole of ``run_cycles`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = fb.FeedbackNetwork(
            fb.FeedbackConv2d(1, 4, 3, padding=1),
            fb.InsNorm(),
            fb.Bias(4),
            fb.AdaReLU(0.1),
            fb.AdaPool2d(2),
            fb.Flatten(),
            fb.FeedbackLinear(4 * (IMAGE // 2) ** 2, CLASSES),
            cycles=2,
            res_param=0.1,
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.net.run_cycles(image)


class Model(nn.Module):
    """Sequence branch (attention, RelLSTM, linear head) plus image branch (CNN-F); the two
    logits add up."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.lstm = RelLSTM(IN, HIDDEN, window=3, relevant=2)
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.cnnf = FeedbackBlock()

    def forward(self, seq: Tensor, image: Tensor) -> Tensor:
        x = seq + self.attn(seq)
        h, _ = self.lstm(x.transpose(0, 1))  # (T, B, HIDDEN)
        return self.head(h[-1]) + self.cnnf(image)


def make_model() -> Model:
    """The same initial parameters in every process (DDP would broadcast rank 0's anyway;
    FSDP2 and the single-process runs rely on this)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Model().double()


def batch(step: int, rows: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
    """The whole batch of ``step`` (the same in every process), restricted to ``rows``."""
    gen = torch.Generator().manual_seed(1000 + step)
    seq = torch.randn(BATCH, T, IN, generator=gen, dtype=torch.float64)
    image = torch.randn(BATCH, 1, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    label = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return seq[rows], image[rows], label[rows]


def train(model: nn.Module, rows: slice) -> None:
    """``STEPS`` steps of SGD with momentum on the mean cross-entropy of ``batch(step, rows)``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        seq, image, label = batch(step, rows)
        opt.zero_grad()
        F.cross_entropy(model(seq, image), label).backward()
        opt.step()


def single_process(rows: slice = slice(None)) -> dict[str, Tensor]:
    model = make_model()
    train(model, rows)
    return model.state_dict()


def shard(rank: int) -> slice:
    per_rank = BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


MODES = ("ddp", "fsdp2", "ddp-bypass", "fsdp2-bypass")


def _run_mode(mode: str, rank: int) -> dict[str, Tensor]:
    """Train under ``mode`` on this rank's shard; the full parameters after it. The bypass
    modes call ``run_cycles`` outside the wrapper's forward: ``"ddp-bypass"`` returns the CNN-F's
    gradients after a backward, ``"fsdp2-bypass"`` is expected to raise."""
    model = make_model()
    if mode.startswith("fsdp2"):
        mesh = init_device_mesh("cpu", (WORLD,))
        for unit in (model.attn, model.lstm, model.cnnf):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if mode == "fsdp2-bypass":
            model.cnnf.net.run_cycles(batch(0, shard(rank))[1])
            return {}
        # Sharded for real: this rank holds about half of the weight.
        w = model.lstm.Wf.weight
        assert w.to_local().numel() < w.numel(), (w.to_local().shape, w.shape)
        train(model, shard(rank))
        return {k: v.full_tensor() for k, v in model.state_dict().items()}
    ddp = nn.parallel.DistributedDataParallel(model)
    if mode == "ddp":
        train(ddp, shard(rank))
        return ddp.module.state_dict()
    _, image, label = batch(0, shard(rank))
    F.cross_entropy(ddp.module.cnnf.net.run_cycles(image), label).backward()
    return {k: p.grad for k, p in ddp.module.cnnf.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every mode in turn (one spawn: starting a process costs seconds here), each
    mode's result, or its traceback, saved to ``out_dir``."""
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=PG_TIMEOUT,
    )
    try:
        results: dict[str, dict[str, Tensor] | str] = {}
        for mode in MODES:
            try:
                results[mode] = _run_mode(mode, rank)
            except Exception:
                results[mode] = traceback.format_exc()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, dict[str, Tensor] | str]]:
    """Spawn ``WORLD`` ranks running ``_worker``; every rank's results, rank order. A rank that
    dies fails the tests with its traceback; one that hangs is killed."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                    p.join()
                pytest.fail(f"the ranks did not finish within {JOIN_TIMEOUT} s")
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]


def results_of(ranks: list[dict[str, dict[str, Tensor] | str]], mode: str) -> list:
    """Every rank's result of ``mode``; a rank's exception fails the test with its traceback."""
    for rank, results in enumerate(ranks):
        if isinstance(results[mode], str):
            pytest.fail(f"{mode} failed on rank {rank}:\n{results[mode]}")
    return [results[mode] for results in ranks]


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def expected() -> dict[str, Tensor]:
    """One process on the whole batch."""
    return single_process()


@pytest.fixture(scope="module")
def rank0_alone() -> dict[str, Tensor]:
    """One process on rank 0's shard only: what a wrapper that did not communicate gives."""
    return single_process(shard(0))


def _check_trained(
    got: dict[str, Tensor], expected: dict[str, Tensor], rank0_alone: dict[str, Tensor]
) -> None:
    init = make_model().state_dict()
    assert got.keys() == init.keys()
    # Every parameter, of each branch, moved by far more than TOL (the smallest update here,
    # lstm.Va's, is ~2e-5), so the comparison below sees every parameter's training.
    for k in init:
        assert (got[k] - init[k]).abs().max() > 1e4 * TOL, k
    # The comparison can tell: training on one shard ends far from the whole batch.
    assert max_diff(rank0_alone, expected) > 1e-4
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=TOL, msg=k)


def test_ddp_equals_one_process(ranks, expected, rank0_alone):
    rank0, rank1 = results_of(ranks, "ddp")
    _check_trained(rank0, expected, rank0_alone)
    assert max_diff(rank0, rank1) == 0.0  # DDP replicas stay identical


def test_fsdp2_equals_one_process(ranks, expected, rank0_alone):
    rank0, rank1 = results_of(ranks, "fsdp2")
    _check_trained(rank0, expected, rank0_alone)
    assert max_diff(rank0, rank1) == 0.0  # every rank gathers the same full parameters


def test_ddp_needs_one_forward_per_step(ranks):
    """Why ``FeedbackBlock`` exists: ``run_cycles`` called on the module inside DDP, not through
    DDP's forward, gives every rank the gradients of its own shard only."""
    rank0, rank1 = results_of(ranks, "ddp-bypass")
    model = make_model()
    local = []
    for rows in (shard(0), shard(1)):
        model.zero_grad()
        _, image, label = batch(0, rows)
        F.cross_entropy(model.cnnf.net.run_cycles(image), label).backward()
        local.append({k: p.grad.clone() for k, p in model.cnnf.named_parameters()})
    assert max_diff(rank0, local[0]) < TOL and max_diff(rank1, local[1]) < TOL
    assert max_diff(rank0, rank1) > 1e-4


def test_fsdp2_needs_one_forward_per_step(ranks):
    """Outside its FSDP unit's forward the CNN-F meets its sharded parameters and raises."""
    for results in ranks:
        assert isinstance(results["fsdp2-bypass"], str), "expected an exception"
        assert "mixed torch.Tensor and DTensor" in results["fsdp2-bypass"]
