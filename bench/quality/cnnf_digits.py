"""CNN-F on real images (issue #19): does generative feedback make the network more robust?

scikit-learn's 1,797 handwritten 8×8 digits (shipped inside the package, no download), split once
(stratified, seed 0), scaled to [-1, 1] as the paper's ``Normalize((0.5,), (0.5,))`` and
upsampled to 28×28 so the paper's Fashion-MNIST network ``screening_attn.feedback.CNNF`` runs
unchanged. Two models with the same initial weights (same seed), epochs, optimizer and batches:

* ``cnnf``: ``CNNF(10, ind=0, cycles=1, res_param=0.1)``, logits from ``run_average`` (the
  paper's evaluation: mean of the logits of the first pass and of the cycle);
* ``cnn``: the same network without feedback, ``cycles=0`` (its bottom-up pass alone, the paper's
  own baseline ``CNNF(10, 0, 0, 0.0)``).

Training follows the paper's code (``train.py``, Fashion-MNIST settings: SGD with momentum 0.9,
weight decay 5e-4, poly learning rate, gradient clipping at 0.5): the loss is the cross-entropy
of every cycle's logits, averaged, plus 0.1 × the mean squared error of each cycle's
reconstruction of the image against the clean image (the paper also compares two intermediate
feature maps; this module uses the package's public API, which exposes the image-level one).
*Standard* training sees clean images; *adversarial* training (from scratch, as the paper's)
adds PGD images (ε = 0.2, made against the bottom-up pass as the paper's ``train_adv`` does, with
the preset's ``train_pgd_steps`` instead of the paper's 7 to fit the CPU budget) and weighs the
clean cross-entropy by 0.1, the adversarial one by 1; the loss's gradients flow through the
cycles. The learning rate is the paper's ``train.py`` default, 0.15 (its Fashion-MNIST script
uses 0.05 over 200 epochs; a few epochs here need the larger one), batches of 32.

Evaluation on the held-out digits: clean accuracy, Gaussian noise (σ), FGSM and PGD (L∞, random
start, step 2.5 ε / steps), all white-box and end to end: the attack differentiates the very
function that is scored (``run_average`` through the feedback cycle). Pixel range [-1, 1], so
ε = 0.2 here is 0.1 of the full [0, 1] range (the paper's Fashion-MNIST ε).

Run alone: ``python -m bench.quality.cnnf_digits [--quick] [--seeds N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from screening_attn.feedback import CNNF

__all__ = ["PRESETS", "Preset", "load_digits_28", "markdown", "run"]

RES_PARAM = 0.1  # the paper's eta, of AdaReLU and of the image update
CYCLES = 1  # the paper's Fashion-MNIST CNN-F (run_train_mnist.sh: --max-cycles 1)
MSE_WEIGHT = 0.1  # the paper's --mse-parameter for Fashion-MNIST
CLEAN_WEIGHT_ADV = 0.1  # its --clean-parameter: weight of the clean cross-entropy in adv training
TRAIN_EPS = 0.2  # its --eps, with --eps-iter 0.071 and 7 steps
LR = 0.15
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_POWER = 0.9
GRAD_CLIP = 0.5
SPLIT_SEED = 0
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Preset:
    """Sizes of one run; both models get the same."""

    epochs: int  # of standard training
    adv_epochs: int  # of adversarial training (from scratch)
    batch_size: int
    train_pgd_steps: int  # PGD steps of the training attack (the paper: 7)
    train_images: int | None  # None: the whole training split
    eval_images: int  # test images every perturbation is scored on (clean: the whole test split)
    pgd_steps: int
    eps: tuple[float, ...]
    sigmas: tuple[float, ...]


PRESETS = {
    "default": Preset(
        epochs=3,
        adv_epochs=3,
        batch_size=32,
        train_pgd_steps=3,
        train_images=None,
        eval_images=200,
        pgd_steps=5,
        eps=(0.1, 0.2, 0.3),
        sigmas=(0.3, 0.6, 1.0),
    ),
    "quick": Preset(
        epochs=2,
        adv_epochs=1,
        batch_size=32,
        train_pgd_steps=2,
        train_images=640,
        eval_images=96,
        pgd_steps=3,
        eps=(0.1, 0.3),
        sigmas=(0.6,),
    ),
}

MODELS = ("cnnf", "cnn")
REGIMES = ("standard", "adversarial")


# --- data -------------------------------------------------------------------------------------


def load_digits_28() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as ``(x_train, y_train, x_test, y_test)``: images `(N, 1, 28, 28)` in [-1, 1]
    (bilinear upsampling of the 8×8 originals, whose pixels run 0..16), labels `(N,)` int64.
    The split is stratified and fixed (seed ``SPLIT_SEED``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    idx_train, idx_test = train_test_split(
        np.arange(len(images)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    x = torch.from_numpy(images).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


# --- models and the cycles --------------------------------------------------------------------


def make_model(name: str, seed: int) -> CNNF:
    """``cnnf`` or ``cnn``: the same architecture and, for one seed, the same initial weights."""
    torch.manual_seed(seed)
    return CNNF(10, ind=0, cycles=CYCLES if name == "cnnf" else 0, res_param=RES_PARAM)


def cycle_outputs(model: CNNF, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The logits of the first pass and of every cycle, and every cycle's reconstruction of the
    image: the cycles of ``run_cycles`` spelled out (``ind=0``: the fed-back map is the image)."""
    model.reset()
    out = model(x)
    logits, recs = [out], []
    ff = x
    for _ in range(model.cycles):
        rec = model.feedback(out)
        ff = ff + model.res_param * (rec - ff)
        out = model(ff)
        logits.append(out)
        recs.append(rec)
    return logits, recs


def predict(model: CNNF, x: Tensor) -> Tensor:
    """The scored logits: the paper's ``run_average`` (the first pass alone when cycles=0)."""
    return model.run_average(x)


def first_pass(model: CNNF, x: Tensor) -> Tensor:
    """The bottom-up pass with no feedback stored: what the paper's training attack targets."""
    model.reset()
    return model(x)


# --- attacks ----------------------------------------------------------------------------------

LogitsFn = Callable[[Tensor], Tensor]


def _input_grad(fn: LogitsFn, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(fn(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)  # the weights' gradients are not computed
    return grad


def fgsm(fn: LogitsFn, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step of size ``eps``, clipped to the pixel range [-1, 1]."""
    return (x + eps * _input_grad(fn, x, y).sign()).clamp(-1.0, 1.0).detach()


def pgd(fn: LogitsFn, x: Tensor, y: Tensor, eps: float, steps: int, gen: torch.Generator) -> Tensor:
    """L∞ PGD from a uniform random start in the ε-ball (advertorch's ``LinfPGDAttack`` as the
    paper uses it), step ``2.5 ε / steps``, clipped to [-1, 1]."""
    step = 2.5 * eps / steps
    delta = (torch.rand(x.shape, generator=gen) * 2.0 - 1.0) * eps
    x_adv = (x + delta).clamp(-1.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv + step * _input_grad(fn, x_adv, y).sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(-1.0, 1.0).detach()
    return x_adv


# --- training ---------------------------------------------------------------------------------


def _loss(model: CNNF, x: Tensor, y: Tensor, x_adv: Tensor | None) -> Tensor:
    """The paper's training loss (``train_adv``): cross-entropy of every cycle's logits, averaged
    (with adversarial images: clean weighted ``CLEAN_WEIGHT_ADV``, then halved), plus
    ``MSE_WEIGHT`` × the reconstruction error of the (adversarial) images against the clean
    ones, averaged over the cycles."""
    n = x.shape[0]
    batch = x if x_adv is None else torch.cat([x, x_adv])
    logits, recs = cycle_outputs(model, batch)
    loss = x.new_zeros(())
    for out in logits:
        if x_adv is None:
            loss = loss + F.cross_entropy(out, y)
        else:
            clean, adv = out.split(n)
            ce = CLEAN_WEIGHT_ADV * F.cross_entropy(clean, y) + F.cross_entropy(adv, y)
            loss = loss + ce / 2.0
    loss = loss / len(logits)
    for rec in recs:
        target_rec = rec if x_adv is None else rec[n:]
        loss = loss + MSE_WEIGHT * F.mse_loss(target_rec, x) / len(recs)
    return loss


def train(
    model: CNNF,
    x: Tensor,
    y: Tensor,
    epochs: int,
    preset: Preset,
    adversarial: bool,
    seed: int,
) -> list[float]:
    """Train in place; returns every epoch's ``(wall, cpu)`` seconds (this process's CPU time:
    on a shared machine the wall time also counts other work). The batch order depends on the
    seed only, so both models see the same batches."""
    opt = torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(x) / preset.batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1.0 - s / total) ** LR_POWER)
    gen = torch.Generator().manual_seed(seed)
    seconds: list[tuple[float, float]] = []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * preset.batch_size : (i + 1) * preset.batch_size]
            xb, yb = x[idx], y[idx]
            x_adv = None
            if adversarial:
                x_adv = pgd(
                    lambda t: first_pass(model, t), xb, yb, TRAIN_EPS, preset.train_pgd_steps, gen
                )
            opt.zero_grad(set_to_none=True)
            _loss(model, xb, yb, x_adv).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            sched.step()
        seconds.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return seconds


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: CNNF, x: Tensor, y: Tensor, batch: int = 256) -> float:
    hits = sum(
        int((predict(model, x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return hits / len(x)


def evaluate(
    model: CNNF, x: Tensor, y: Tensor, x_eval: Tensor, y_eval: Tensor, preset: Preset, seed: int
) -> list[dict]:
    """Accuracy rows ``{"attack", "strength", "accuracy"}``: clean on the whole test split, the
    perturbations on its first ``preset.eval_images`` images."""
    gen = torch.Generator().manual_seed(seed + 1000)

    def fn(t: Tensor) -> Tensor:
        return predict(model, t)

    rows = [{"attack": "clean", "strength": 0.0, "accuracy": _accuracy(model, x, y)}]
    for sigma in preset.sigmas:
        noisy = (x_eval + sigma * torch.randn(x_eval.shape, generator=gen)).clamp(-1.0, 1.0)
        rows.append(
            {"attack": "noise", "strength": sigma, "accuracy": _accuracy(model, noisy, y_eval)}
        )
    for eps in preset.eps:
        x_f = fgsm(fn, x_eval, y_eval, eps)
        rows.append({"attack": "fgsm", "strength": eps, "accuracy": _accuracy(model, x_f, y_eval)})
        x_p = pgd(fn, x_eval, y_eval, eps, preset.pgd_steps, gen)
        rows.append({"attack": "pgd", "strength": eps, "accuracy": _accuracy(model, x_p, y_eval)})
    return rows


# --- the task ---------------------------------------------------------------------------------


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(quick: bool, seeds: list[int], out_dir: pathlib.Path, log: Callable[[str], None]) -> dict:
    """Train and attack both models under both regimes for every seed; write the plot into
    ``out_dir``; return the JSON-able result (``rows``: one per model, regime, attack and
    strength, mean and spread over the seeds; ``runs``: every seed's figures)."""
    preset = PRESETS["quick" if quick else "default"]
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_28()
    if preset.train_images is not None:
        x_train, y_train = x_train[: preset.train_images], y_train[: preset.train_images]
    x_eval, y_eval = x_test[: preset.eval_images], y_test[: preset.eval_images]
    log(
        f"cnnf: digits {len(x_train)} train / {len(x_test)} test images "
        f"({len(x_eval)} attacked), seeds {seeds}, {torch.get_num_threads()} threads"
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    # the epoch times compare the models; other load on the machine slows both
    loadavg = [round(v, 2) for v in os.getloadavg()]
    runs = []
    for regime in REGIMES:
        adversarial = regime == "adversarial"
        epochs = preset.adv_epochs if adversarial else preset.epochs
        for seed in seeds:
            for name in MODELS:
                model = make_model(name, seed)
                seconds = train(model, x_train, y_train, epochs, preset, adversarial, seed)
                wall, cpu = ([s[i] for s in seconds] for i in (0, 1))
                rows = evaluate(model, x_test, y_test, x_eval, y_eval, preset, seed)
                runs.append(
                    {
                        "model": name,
                        "regime": regime,
                        "seed": seed,
                        "epoch_seconds": wall,
                        "epoch_cpu_seconds": cpu,
                        "accuracy": rows,
                    }
                )
                acc = {(r["attack"], r["strength"]): r["accuracy"] for r in rows}
                log(
                    f"cnnf: {regime:11s} {name:4s} seed {seed}: clean "
                    f"{acc['clean', 0.0]:.3f}, pgd ε={preset.eps[-1]} "
                    f"{acc['pgd', preset.eps[-1]]:.3f}, {statistics.fmean(cpu):.1f} s CPU/epoch"
                )
    result = {
        "task": "cnnf",
        "preset": "quick" if quick else "default",
        "config": {
            **asdict(preset),
            "cycles": CYCLES,
            "res_param": RES_PARAM,
            "mse_weight": MSE_WEIGHT,
            "clean_weight_adv": CLEAN_WEIGHT_ADV,
            "train_eps": TRAIN_EPS,
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "split_seed": SPLIT_SEED,
            "train_images": len(x_train),
            "test_images": len(x_test),
            "eval_images": len(x_eval),
        },
        "seeds": list(seeds),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "loadavg_start": loadavg,
        "rows": _rows(runs),
        "epoch_seconds": _epoch_rows(runs),
        "runs": runs,
        "seconds_total": round(time.perf_counter() - started, 1),
        "cpu_seconds_total": round(time.process_time() - cpu_started, 1),
        "plots": [],
    }
    plot = "quality-cnnf-accuracy.png"
    _plot(result, out_dir / plot)
    result["plots"].append(plot)
    log(
        f"cnnf: done in {result['seconds_total']:.0f} s "
        f"({result['cpu_seconds_total']:.0f} s of CPU time)"
    )
    return result


def _rows(runs: list[dict]) -> list[dict]:
    """One flat row per (regime, attack, strength, model), mean and spread over the seeds."""
    acc: dict[tuple, list[float]] = {}
    for r in runs:
        for a in r["accuracy"]:
            acc.setdefault((r["regime"], a["attack"], a["strength"], r["model"]), []).append(
                a["accuracy"]
            )
    rows = []
    for (regime, attack, strength, model), values in acc.items():
        mean, std = _summary(values)
        rows.append(
            {
                "regime": regime,
                "attack": attack,
                "strength": strength,
                "model": model,
                "accuracy_mean": round(mean, 4),
                "accuracy_std": round(std, 4),
                "seeds": len(values),
            }
        )
    return rows


def _epoch_rows(runs: list[dict]) -> list[dict]:
    """Seconds per epoch per (regime, model), wall and CPU: the mean and spread over the seeds of
    each run's median epoch."""
    out = []
    for regime in REGIMES:
        for model in MODELS:
            mine = [r for r in runs if (r["regime"], r["model"]) == (regime, model)]
            row: dict = {"regime": regime, "model": model}
            for key, field in (("seconds", "epoch_seconds"), ("cpu_seconds", "epoch_cpu_seconds")):
                mean, std = _summary([statistics.median(r[field]) for r in mine])
                row[f"{key}_mean"], row[f"{key}_std"] = round(mean, 3), round(std, 3)
            out.append(row)
    return out


def _plot(result: dict, path: pathlib.Path) -> None:
    """Accuracy against strength: one panel per regime × perturbation, one line per model with
    its spread over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [("noise", "Gaussian noise σ"), ("fgsm", "FGSM ε"), ("pgd", "PGD ε")]
    fig, axes = plt.subplots(
        len(REGIMES), len(attacks), figsize=(11, 6.5), sharey=True, squeeze=False
    )
    rows = result["rows"]
    for i, regime in enumerate(REGIMES):
        for j, (attack, label) in enumerate(attacks):
            ax = axes[i][j]
            for model, style in (("cnnf", "o-"), ("cnn", "s--")):
                clean = [
                    r
                    for r in rows
                    if (r["regime"], r["attack"], r["model"]) == (regime, "clean", model)
                ]
                pts = clean + sorted(
                    (
                        r
                        for r in rows
                        if (r["regime"], r["attack"], r["model"]) == (regime, attack, model)
                    ),
                    key=lambda r: r["strength"],
                )
                xs = [r["strength"] for r in pts]
                ys = np.array([r["accuracy_mean"] for r in pts])
                sd = np.array([r["accuracy_std"] for r in pts])
                name = "CNN-F (feedback)" if model == "cnnf" else "CNN (no feedback)"
                ax.plot(xs, ys, style, label=name)
                ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
            ax.set_xlabel(label)
            ax.set_ylim(0.0, 1.02)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{regime} training\naccuracy")
            if i == 0 and j == 0:
                ax.legend(loc="lower left", fontsize=8)
    seeds = len(result["seeds"])
    fig.suptitle(
        f"CNN-F vs CNN on sklearn digits (28×28), mean ± sd over {seeds} seeds, "
        f"{result['preset']} preset; attacks end to end through the cycles",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The table (accuracy, mean ± sd over the seeds; time per epoch) and what it shows."""
    rows = {(r["regime"], r["attack"], r["strength"], r["model"]): r for r in result["rows"]}
    seeds = len(result["seeds"])
    cfg = result["config"]
    lines = [
        f"**CNN-F on digits** (sklearn `load_digits` upsampled to 28×28, {cfg['train_images']} "
        f"train / {cfg['test_images']} test images, perturbations on {cfg['eval_images']}; "
        f"accuracy, mean ± sd over {seeds} seeds; {cfg['epochs']} standard / "
        f"{cfg['adv_epochs']} adversarial epochs; attacks white-box through the cycles, pixels "
        f"in [-1, 1]):",
        "",
        "| training | perturbation | CNN-F | CNN (no feedback) | CNN-F − CNN |",
        "|---|---|---|---|---|",
    ]
    verdict: dict[str, dict[str, list[str]]] = {}
    for regime in REGIMES:
        keys = sorted(
            {k[1:3] for k in rows if k[0] == regime},
            key=lambda k: (["clean", "noise", "fgsm", "pgd"].index(k[0]), k[1]),
        )
        for attack, strength in keys:
            f, c = rows[regime, attack, strength, "cnnf"], rows[regime, attack, strength, "cnn"]
            diff = f["accuracy_mean"] - c["accuracy_mean"]
            what = "clean" if attack == "clean" else f"{_ATTACK_NAMES[attack]} {strength:g}"
            lines.append(f"| {regime} | {what} | {_pm(f)} | {_pm(c)} | {100 * diff:+.1f} pts |")
            # a difference counts only beyond the larger of the two models' spreads
            spread = max(f["accuracy_std"], c["accuracy_std"])
            side = "helps" if diff > spread else "hurts" if diff < -spread else "same"
            verdict.setdefault(regime, {}).setdefault(side, []).append(what)
    secs = {(r["regime"], r["model"]): r["cpu_seconds_mean"] for r in result["epoch_seconds"]}
    threads = result["threads"]
    lines += [
        "",
        f"CPU time per epoch ({threads} thread{'s' if threads != 1 else ''}; the process's "
        f"own, the machine's load average was {result['loadavg_start']} at the start): "
        + "; ".join(
            f"{regime} training CNN-F {secs[regime, 'cnnf']:.1f} s vs CNN "
            f"{secs[regime, 'cnn']:.1f} s ({secs[regime, 'cnnf'] / secs[regime, 'cnn']:.1f}×)"
            for regime in REGIMES
        )
        + ".",
        "",
    ]
    words = {
        "helps": "helps on",
        "hurts": "is worse on",
        "same": "makes no difference beyond the seeds' spread on",
    }
    lines.append(
        " ".join(
            f"Under {regime} training feedback "
            + "; ".join(f"{words[s]} {', '.join(v)}" for s, v in sides.items())
            + "."
            for regime, sides in verdict.items()
        )
    )
    return "\n".join(lines)


_ATTACK_NAMES = {"noise": "noise σ", "fgsm": "FGSM ε", "pgd": "PGD ε"}


def _pm(row: dict) -> str:
    return f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}"


# --- running it alone -------------------------------------------------------------------------


def _machine_slug() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1]
                break
    except OSError:
        pass
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", cpu.lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "machine"
    return f"{cpu}-{os.cpu_count()}c"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small preset (about a minute)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = parser.parse_args(argv)
    stem = f"quality-cnnf-{_machine_slug()}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = args.out
    result = run(args.quick, list(range(args.seeds)), out, lambda s: print(s, flush=True))
    # the plot carries the run's name so results of several runs can sit side by side
    for i, plot in enumerate(result["plots"]):
        named = f"{stem}-{plot.removeprefix('quality-cnnf-')}"
        (out / plot).rename(out / named)
        result["plots"][i] = named
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"wrote {out / stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
