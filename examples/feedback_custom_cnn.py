"""Turn your own small CNN into its CNN-F feedback version (Huang et al., NeurIPS 2020).

A CNN-F network alternates a bottom-up pass, whose ReLUs and max-pools are gated by a
top-down signal (AdaReLU, AdaPool2d), with a top-down pass through the same weights transposed
(FeedbackConv2d / FeedbackLinear). Every layer of ``screening_attn.feedback`` has a ``forward``
and a ``feedback``; ``FeedbackNetwork`` runs the cycles. This script:

1. trains a plain 2-conv CNN on a synthetic task (oriented bars in noise), a few seconds;
2. converts it exactly: conv -> FeedbackConv2d + Bias (its bias), ReLU -> AdaReLU,
   MaxPool2d -> AdaPool2d, Linear -> FeedbackLinear + Bias, and a top-down InsNorm after each
   gate. Before any feedback the gates are a plain ReLU and max-pool, so the first pass gives
   the CNN's logits; the cycles then change them;
3. converts it the paper's way (an instance norm before each bias: conv, InsNorm, Bias,
   AdaReLU, AdaPool2d), fine-tunes it through the feedback cycles (the loss backpropagates
   through every cycle, as adversarial training does) and lists the fused kernels one cycle
   runs;
4. checks the compiled CPU kernels against the pure-PyTorch reference and times both.

The accuracies it prints are measurements, not promises: the paper also trains the top-down
path (reconstruction losses), which this short demo does not.

Run::

    python examples/feedback_custom_cnn.py
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from screening_attn.feedback import (
    AdaPool2d,
    AdaReLU,
    Bias,
    FeedbackConv2d,
    FeedbackLinear,
    FeedbackNetwork,
    Flatten,
    InsNorm,
    feedback_step,
)

SIZE, CLASSES = 16, 4


def bars(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one bar (horizontal, vertical, diagonal, anti-diagonal = the label) at a
    random offset, plus Gaussian noise."""
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    images = torch.zeros(n, 1, SIZE, SIZE)
    idx = torch.arange(SIZE)
    for i, (label, offset) in enumerate(
        zip(labels, torch.randint(3, SIZE - 3, (n,), generator=gen))
    ):
        if label == 0:
            images[i, 0, offset, :] = 1.0
        elif label == 1:
            images[i, 0, :, offset] = 1.0
        elif label == 2:
            images[i, 0, idx, (idx + offset) % SIZE] = 1.0
        else:
            images[i, 0, idx, (offset - idx) % SIZE] = 1.0
    return images + noise * torch.randn(images.shape, generator=gen), labels


def your_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (SIZE // 4) ** 2, CLASSES),
    )


def to_feedback(
    cnn: nn.Sequential,
    *,
    bottom_up_norm: bool,
    res_param: float = 0.1,
    cycles: int = 2,
    backend: str = "auto",
) -> FeedbackNetwork:
    """The feedback version of a plain ``nn.Sequential`` of Conv2d, ReLU, MaxPool2d, Flatten
    and Linear layers, with its weights.

    ``bottom_up_norm=False`` converts exactly (the first pass is the CNN). ``True`` is the
    paper's recipe, an InsNorm between each convolution and its bias (then fine-tune). A
    top-down InsNorm follows each gate either way: it normalizes the signal the gates below
    receive, as the paper's networks do.
    """
    layers: list[nn.Module] = []
    modules = list(cnn)
    spatial = True  # before Flatten: 4-d maps, where the top-down InsNorm applies
    for i, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            conv = FeedbackConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
            )
            conv.weight.data.copy_(module.weight.data)
            layers.append(conv)
            if bottom_up_norm:
                layers.append(InsNorm(backend=backend))
            layers.append(_bias(module.bias))
        elif isinstance(module, nn.Linear):
            linear = FeedbackLinear(module.in_features, module.out_features)
            linear.weight.data.copy_(module.weight.data)
            layers += [linear, _bias(module.bias)]
        elif isinstance(module, nn.ReLU):
            layers.append(AdaReLU(res_param, backend=backend))
        elif isinstance(module, nn.MaxPool2d):
            layers.append(AdaPool2d(module.kernel_size, backend=backend))
        elif isinstance(module, nn.Flatten):
            layers.append(Flatten())
            spatial = False
        else:
            raise TypeError(f"no feedback version of {type(module).__name__} here")
        # the top-down norm goes above each gate (above the pool when one follows the ReLU)
        next_is_pool = i + 1 < len(modules) and isinstance(modules[i + 1], nn.MaxPool2d)
        gate_top = isinstance(module, nn.MaxPool2d) or (
            isinstance(module, nn.ReLU) and not next_is_pool
        )
        if spatial and gate_top:
            layers.append(InsNorm(bottom_up=False, top_down=True, backend=backend))
    return FeedbackNetwork(*layers, cycles=cycles, res_param=res_param, backend=backend)


def _bias(bias: torch.Tensor) -> Bias:
    layer = Bias(bias.shape[0])
    layer.bias.data.copy_(bias.data)
    return layer


class _OurOps(TorchFunctionMode):
    """Records the screening_attn ops called inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("screening_attn."):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def train(step_loss, params, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        step_loss().backward()
        opt.step()


def main() -> None:
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and timings are stable
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = bars(512, 0.5, gen)
    x_test, y_test = bars(512, 0.5, gen)
    x_noisy, y_noisy = bars(512, 1.0, gen)

    # 1. your CNN
    cnn = your_cnn()
    t0 = time.perf_counter()

    def cnn_loss():
        batch = torch.randint(0, len(x_train), (64,))
        return nn.functional.cross_entropy(cnn(x_train[batch]), y_train[batch])

    train(cnn_loss, cnn.parameters(), 300, 3e-3)
    with torch.no_grad():
        print(f"1. plain CNN, trained in {time.perf_counter() - t0:.1f} s")
        print(
            f"   accuracy: test {accuracy(cnn(x_test), y_test):.3f}, "
            f"noisier test {accuracy(cnn(x_noisy), y_noisy):.3f}"
        )

    # 2. exact conversion: the first pass is the CNN
    net = to_feedback(cnn, bottom_up_norm=False)
    print("\n2. its feedback version, layer by layer (units of the FeedbackNetwork):")
    print("   " + " -> ".join(type(u).__name__ for u in net.units()))
    with torch.no_grad():
        net.reset()
        first = net(x_test)
        diff = (first - cnn(x_test)).abs().max().item()
        print(f"   first pass vs the CNN: max |logit difference| = {diff:.2e}")
        for name, data, labels in (("test", x_test, y_test), ("noisier", x_noisy, y_noisy)):
            net.reset()
            out, ff = net.forward_capture(data, net.ff_unit)
            accs = [accuracy(out, labels)]
            for _ in range(3):
                out, ff = feedback_step(net, out, ff)
                accs.append(accuracy(out, labels))
            shown = ", ".join(f"{a:.3f}" for a in accs)
            print(f"   {name} accuracy after 0, 1, 2, 3 feedback cycles (no fine-tuning): {shown}")

    # 3. the paper's recipe, fine-tuned through the cycles
    net = to_feedback(cnn, bottom_up_norm=True, cycles=2)
    t0 = time.perf_counter()

    def cycles_loss():
        batch = torch.randint(0, len(x_train), (64,))
        images = x_train[batch].requires_grad_()  # as adversarial training needs
        loss = nn.functional.cross_entropy(net.run_average(images), y_train[batch])
        return loss

    train(cycles_loss, net.parameters(), 150, 3e-3)
    with torch.no_grad():
        print(
            f"\n3. paper's recipe (InsNorm before each bias), fine-tuned through 2 cycles in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        for name, data, labels in (("test", x_test, y_test), ("noisier", x_noisy, y_noisy)):
            net.reset()
            first = accuracy(net(data), labels)
            print(
                f"   {name}: first pass {first:.3f}, run_cycles "
                f"{accuracy(net.run_cycles(data), labels):.3f}, run_average "
                f"{accuracy(net.run_average(data), labels):.3f}"
            )
        net.reset()
        out, ff = net.forward_capture(x_test[:8], net.ff_unit)
        with _OurOps() as ours:
            feedback_step(net, out, ff)
        print(f"   one feedback_step runs {len(ours.names)} kernels of ours:")
        for op in dict.fromkeys(ours.names):
            print(f"     {op} x{ours.names.count(op)}")
        print(f"   the image reconstruction of the top-down pass: {tuple(net.feedback(out).shape)}")

    # 4. the compiled kernels against the reference
    ref = to_feedback(cnn, bottom_up_norm=True, cycles=2, backend="reference")
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        times = {}
        for name, model in (("cpu", net), ("reference", ref)):
            model.run_cycles(x_test)
            t0 = time.perf_counter()
            for _ in range(5):
                logits = model.run_cycles(x_test)
            times[name] = (time.perf_counter() - t0) / 5 * 1e3
            times[name + "_logits"] = logits
    diff = (times["cpu_logits"] - times["reference_logits"]).abs().max().item()
    print(
        f"\n4. run_cycles on {len(x_test)} images: backend='cpu' {times['cpu']:.1f} ms, "
        f"backend='reference' {times['reference']:.1f} ms; max |logit difference| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
