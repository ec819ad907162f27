"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") with full, sliding-window
and relevancy-screened attention at the same key budget.

A sequence is ``n`` key-value pairs, ``gap`` filler tokens, then a query of every key of the
pairs in a random order; at each query the model must output that key's value:

    k1 v1 k2 v2 ... kn vn | _ _ ... _ (gap) | k3 k1 ... (n queries)

Every gap of the evaluation is longer than the reach of a sliding window of ν+ρ keys through
the layers, layers·(ν+ρ-1) positions, so no query can see any pair through it (chance:
1 / number of values). Full causal attention sees
everything. Screened attention sees the last ν keys plus the ρ older keys that received the
most attention while in the window: it can answer only if its relevant sets hold the pairs.
Relevancy is a statistic, not a learned choice (no gradient flows through the selection), so
the benchmark measures whether the attention a model learns for the task also makes it keep
the right keys.

One model per attention type and seed is trained on a mix of layouts (number of pairs and gap
drawn per batch, gaps from 0 so that short ones are learnable by every variant) with the same
data stream, initialisation, optimizer, learning rate and number of steps for all three, and
then evaluated on a fixed grid of (pairs, gap) settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import screening_attn
from bench.quality._common import Log, Stopwatch, markdown_table, mean_std, pyplot, save_figure
from bench.quality._common import seed_everything as _seed

ATTENTIONS = ("full", "window", "screened")
FILLER = 0


@dataclass(frozen=True)
class Config:
    """One preset of the task: model, key budget, training mix and evaluation grid."""

    window: int = 8  # ν
    relevant: int = 4  # ρ
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    positions: str = "rotary"  # or "learned"
    n_keys: int = 16
    n_values: int = 16
    steps: int = 500
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50
    train_pairs: tuple[int, int] = (1, 8)  # inclusive range, drawn per batch
    train_gap: tuple[int, int] = (0, 48)
    eval_pairs: tuple[int, ...] = (2, 3, 4, 6, 8)
    eval_gaps: tuple[int, ...] = (24, 48)  # all > layers * (ν+ρ-1): out of the window's reach
    extra_eval: tuple[tuple[int, int], ...] = ((2, 0),)  # (pairs, gap): within every budget
    eval_size: int = 512
    eval_seed: int = 12345
    log_every: int = 50

    @property
    def max_len(self) -> int:
        pairs = max(self.train_pairs[1], *self.eval_pairs, *(p for p, _ in self.extra_eval))
        gap = max(self.train_gap[1], *self.eval_gaps, *(g for _, g in self.extra_eval))
        return 3 * pairs + gap

    def settings(self) -> list[tuple[int, int]]:
        """The evaluation grid: (pairs, gap) for every pair count and gap, then the extras."""
        grid = [(p, g) for g in self.eval_gaps for p in self.eval_pairs]
        return grid + [s for s in self.extra_eval if s not in grid]


DEFAULT = Config()
QUICK = replace(
    DEFAULT,
    steps=200,
    train_gap=(0, 24),
    eval_pairs=(2, 4, 8),
    eval_gaps=(24,),
    eval_size=256,
    log_every=25,
)


def make_batch(
    pairs: int, gap: int, batch: int, cfg: Config, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``(batch, 3*pairs + gap)`` and targets of the same shape (the value index at
    each query position, -100 elsewhere). Token 0 is the filler, 1..n_keys the keys,
    n_keys+1.. the values."""
    keys = torch.rand(batch, cfg.n_keys, generator=gen).argsort(1)[:, :pairs] + 1
    values = torch.randint(0, cfg.n_values, (batch, pairs), generator=gen)
    order = torch.rand(batch, pairs, generator=gen).argsort(1)
    context = torch.stack([keys, values + 1 + cfg.n_keys], 2).reshape(batch, 2 * pairs)
    filler = torch.full((batch, gap), FILLER, dtype=torch.long)
    queries = keys.gather(1, order)
    tokens = torch.cat([context, filler, queries], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs + gap :] = values.gather(1, order)
    return tokens, targets


class Attention(nn.Module):
    """Multi-head causal self-attention; ``kind`` picks how the keys are restricted."""

    def __init__(self, cfg: Config, kind: str) -> None:
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention kind must be one of {ATTENTIONS}, got {kind!r}")
        self.kind, self.heads = kind, cfg.heads
        self.window, self.relevant = cfg.window, cfg.relevant
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
        if self.kind == "full":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "window":
            # relevant=0 is exactly causal sliding-window attention of width ν+ρ, same kernel
            y = screening_attn.screened_attention(q, k, v, self.window + self.relevant, 0)
        else:
            y = screening_attn.screened_attention(q, k, v, self.window, self.relevant)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: Config, kind: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, kind)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token and learned position embeddings, ``layers`` blocks, a head over the values."""

    def __init__(self, cfg: Config, kind: str) -> None:
        super().__init__()
        self.tok = nn.Embedding(1 + cfg.n_keys + cfg.n_values, cfg.d_model)
        self.rotary = cfg.positions == "rotary"
        self.pos = None if self.rotary else nn.Embedding(cfg.max_len, cfg.d_model)
        self.head_dim = cfg.d_model // cfg.heads
        self.blocks = nn.ModuleList(Block(cfg, kind) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_values)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.tok(tokens)
        rope = _rope_angles(T, self.head_dim) if self.rotary else None
        if self.pos is not None:
            x = x + self.pos(torch.arange(T))
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.ln(x))


def _rope_angles(T: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary position angles (T, dim/2)."""
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.outer(torch.arange(T, dtype=torch.float32), inv)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, T, D) by (T, D/2) angles (pairs of halves)."""
    x1, x2 = x.chunk(2, -1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _loss_acc(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor):
    logits = model(tokens)
    mask = targets >= 0
    loss = F.cross_entropy(logits[mask], targets[mask])
    acc = (logits[mask].argmax(-1) == targets[mask]).float().mean()
    return loss, acc


def train(cfg: Config, kind: str, seed: int, log: Log) -> dict:
    """Train one model; return its evaluation per setting, its loss curve and training time."""
    gen = _seed(seed)
    # the same initial weights for every attention type: they differ in no parameter
    model = Transformer(cfg, kind)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, window_loss, window_acc = [], [], []
    clock = Stopwatch()
    for step in range(1, cfg.steps + 1):
        pairs = int(torch.randint(cfg.train_pairs[0], cfg.train_pairs[1] + 1, (), generator=gen))
        gap = int(torch.randint(cfg.train_gap[0], cfg.train_gap[1] + 1, (), generator=gen))
        tokens, targets = make_batch(pairs, gap, cfg.batch, cfg, gen)
        model.train()
        loss, acc = _loss_acc(model, tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window_loss.append(loss.item())
        window_acc.append(acc.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            curve.append(
                {
                    "step": step,
                    "loss": sum(window_loss) / len(window_loss),
                    "acc": sum(window_acc) / len(window_acc),
                }
            )
            log(
                f"  mqar {kind:8s} seed {seed} step {step:5d}/{cfg.steps} "
                f"loss {curve[-1]['loss']:.3f} query acc {curve[-1]['acc']:.3f} "
                f"({clock():.0f} s)"
            )
            window_loss, window_acc = [], []
    train_s, train_cpu_s = clock(), clock.cpu()
    return {
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "curve": curve,
        "eval": evaluate(model, cfg),
    }


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, float]:
    """Query accuracy on a fixed held-out set per (pairs, gap) setting, same for every model."""
    model.eval()
    out = {}
    for pairs, gap in cfg.settings():
        gen = torch.Generator().manual_seed(cfg.eval_seed + 1000 * pairs + gap)
        correct = total = 0
        for start in range(0, cfg.eval_size, 128):
            n = min(128, cfg.eval_size - start)
            tokens, targets = make_batch(pairs, gap, n, cfg, gen)
            logits = model(tokens)
            mask = targets >= 0
            correct += int((logits[mask].argmax(-1) == targets[mask]).sum())
            total += int(mask.sum())
        out[f"{pairs},{gap}"] = correct / total
    return out


def units(quick: bool, seeds: list[int]) -> list[str]:
    """The independent trainings, ``"<attention>/<seed>"``: ``run_unit`` runs one anywhere."""
    return [f"{kind}/{seed}" for kind in ATTENTIONS for seed in seeds]


def run_unit(quick: bool, unit: str, log: Log) -> dict:
    """Train and evaluate the model of one unit of ``units``."""
    kind, seed = unit.split("/")
    return train(QUICK if quick else DEFAULT, kind, int(seed), log)


def run(quick: bool, seeds: list[int], out_dir: Path, log: Log) -> dict:
    """Train every attention type with every seed; the table has one row per setting and type."""
    return collect(
        quick, seeds, {u: run_unit(quick, u, log) for u in units(quick, seeds)}, out_dir, log
    )


def collect(quick: bool, seeds: list[int], runs: dict, out_dir: Path, log: Log) -> dict:
    """The result of the trainings ``runs`` (``run_unit``'s, by unit): table, plots, summary."""
    cfg = QUICK if quick else DEFAULT
    log(
        f"mqar: d_model {cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads, ν={cfg.window}, "
        f"ρ={cfg.relevant} (key budget {cfg.window + cfg.relevant}), {cfg.steps} steps of "
        f"batch {cfg.batch}, {torch.get_num_threads()} threads"
    )
    rows = []
    for pairs, gap in cfg.settings():
        for kind in ATTENTIONS:
            accs = [runs[f"{kind}/{s}"]["eval"][f"{pairs},{gap}"] for s in seeds]
            mean, std = mean_std(accs)
            train_s = mean_std(runs[f"{kind}/{s}"]["train_s"] for s in seeds)[0]
            train_cpu_s = mean_std(runs[f"{kind}/{s}"]["train_cpu_s"] for s in seeds)[0]
            rows.append(
                {
                    "pairs": pairs,
                    "gap": gap,
                    "attention": kind,
                    "acc_mean": round(mean, 4),
                    "acc_std": round(std, 4),
                    "acc_min": round(min(accs), 4),
                    "acc_max": round(max(accs), 4),
                    "seeds": len(seeds),
                    "train_s": round(train_s, 1),
                    "train_cpu_s": round(train_cpu_s, 1),
                }
            )
    result = {
        "config": asdict(cfg),
        "chance": 1 / cfg.n_values,
        "rows": rows,
        "runs": runs,
    }
    result["plots"] = plots(result, out_dir)
    log(markdown(result))
    return result


def plots(result: dict, out_dir: Path) -> list[str]:
    """Accuracy against pairs per gap, and the loss curves (from ``result``, also as read back
    from JSON)."""
    cfg = Config(
        **{
            k: tuple(map(_tuple, v)) if isinstance(v, list) else v
            for k, v in result["config"].items()
        }
    )
    plt = pyplot()
    gaps = list(cfg.eval_gaps)
    fig, axes = plt.subplots(1, len(gaps) + 1, figsize=(4.2 * (len(gaps) + 1), 3.8), squeeze=False)
    rows = result["rows"]
    for ax, gap in zip(axes[0], gaps):
        for kind in ATTENTIONS:
            pts = [r for r in rows if r["gap"] == gap and r["attention"] == kind]
            pts = [r for r in pts if r["pairs"] in cfg.eval_pairs]
            ax.errorbar(
                [r["pairs"] for r in pts],
                [r["acc_mean"] for r in pts],
                yerr=[r["acc_std"] for r in pts],
                marker="o",
                capsize=3,
                label=kind,
            )
        ax.axhline(result["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.axvline(cfg.relevant, color="gray", ls="--", lw=0.8)
        ax.set_xticks(list(cfg.eval_pairs))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("key-value pairs (dashed: ρ)")
        ax.set_title(f"gap {gap} (ν={cfg.window}, ρ={cfg.relevant})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("query accuracy (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    for kind in ATTENTIONS:
        curves = [v["curve"] for k, v in result["runs"].items() if k.startswith(kind + "/")]
        steps = [p["step"] for p in curves[0]]
        loss = [sum(c[i]["loss"] for c in curves) / len(curves) for i in range(len(steps))]
        ax.plot(steps, loss, marker=".", label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("training (mixed layouts)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [save_figure(fig, out_dir, "quality-mqar.png")]


def _times(row: dict) -> str:
    cpu = row.get("train_cpu_s")  # absent from results of before it was recorded
    return f"{row['train_s']:.0f} s" + (f" ({cpu:.0f} s)" if cpu is not None else "")


def _tuple(x):
    return tuple(x) if isinstance(x, list) else x


def markdown(result: dict) -> str:
    """The accuracy table (mean ± std over seeds) and what it shows."""
    cfg = result["config"]
    rows = []
    by = {(r["pairs"], r["gap"], r["attention"]): r for r in result["rows"]}
    settings = list(dict.fromkeys((r["pairs"], r["gap"]) for r in result["rows"]))
    for pairs, gap in settings:
        row = {"setting": f"{pairs} pairs, gap {gap}"}
        for kind in ATTENTIONS:
            r = by[(pairs, gap, kind)]
            row[kind] = f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}"
        rows.append(row)
    times = {k: by[(*settings[0], k)] for k in ATTENTIONS}
    rows.append(
        {
            "setting": "training time per model: wall (CPU)",
            **{k: _times(r) for k, r in times.items()},
        }
    )
    cols = [("setting", "MQAR query accuracy")] + [
        (
            k,
            {
                "full": "full causal",
                "window": f"window {cfg['window'] + cfg['relevant']}",
                "screened": f"screened ν={cfg['window']}, ρ={cfg['relevant']}",
            }[k],
        )
        for k in ATTENTIONS
    ]
    return markdown_table(rows, cols) + "\n\n" + summary(result)


def summary(result: dict) -> str:
    """A plain sentence of what the numbers show, computed from them."""
    cfg = result["config"]
    chance = result["chance"]
    rows = result["rows"]
    reach = cfg["layers"] * (cfg["window"] + cfg["relevant"] - 1)
    far = [r for r in rows if r["gap"] > reach]

    def mean_of(kind: str, pred) -> float:
        xs = [r["acc_mean"] for r in far if r["attention"] == kind and pred(r)]
        return sum(xs) / len(xs) if xs else float("nan")

    few = lambda r: r["pairs"] <= cfg["relevant"]  # noqa: E731
    many = lambda r: r["pairs"] > cfg["relevant"]  # noqa: E731
    return (
        f"Over the gaps longer than the sliding window's reach ({reach}): with at "
        f"most ρ={cfg['relevant']} pairs, full attention averages {mean_of('full', few):.2f}, "
        f"the sliding window {mean_of('window', few):.2f} (chance {chance:.2f}) and screening "
        f"{mean_of('screened', few):.2f}; with more pairs than ρ, "
        f"{mean_of('full', many):.2f}, {mean_of('window', many):.2f} and "
        f"{mean_of('screened', many):.2f}."
    )
