"""Generate with screened attention in a transformers model, and compare the cache's memory with
transformers' ``DynamicCache`` (docs/streaming.md#transformers).

A Llama-shaped model is built from a config (random weights: nothing is downloaded), once with
``attn_implementation="screened"`` and a ``ScreenedCache``, once with sdpa and a
``DynamicCache``, with the same weights. Both greedily decode from the same prompt; the script
prints the cache memory after the prefill and after decoding, and the time per decode step.
Screened attention runs on the pure-PyTorch reference for now (the compiled kernels do not take
grouped heads or an initial state yet), so expect it to be slower than sdpa: this example shows
the memory bound and the API, not speed.

Usage::

    python examples/hf_generate.py                      # prompt 256, 64 new tokens
    python examples/hf_generate.py --prompt 1024 --new 128 --window 64 --relevant 32
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import screening_attn.hf
from screening_attn.hf import ScreenedCache


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def run(model, ids, make_cache, new: int, nbytes) -> tuple[torch.Tensor, float, int, int]:
    """Greedy ``generate`` of ``new`` tokens with a fresh cache; the tokens, the decode time per
    new token (a run of one new token, i.e. the prefill, subtracted), and the cache's bytes
    after the prefill and at the end."""

    def timed(n: int):
        cache = make_cache()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False)
        return out, time.perf_counter() - t0, nbytes(cache)

    _, t_prefill, after_prefill = timed(1)
    out, t_all, at_end = timed(new)
    return out, (t_all - t_prefill) / max(new - 1, 1), after_prefill, at_end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", type=int, default=256, help="prompt length")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    p.add_argument("--window", type=int, default=32, help="screening_window (ν)")
    p.add_argument("--relevant", type=int, default=16, help="screening_relevant (ρ)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.prompt + args.new,
        pad_token_id=0,
        eos_token_id=None,
    )
    config.screening_window, config.screening_relevant = args.window, args.relevant
    models = {}
    for attn in ("screened", "sdpa"):
        torch.manual_seed(0)  # the same weights for both
        # from_config keeps and mutates its config: each model gets its own copy
        models[attn] = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=attn
        ).eval()
    ids = torch.randint(
        1, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1)
    )

    screened = run(
        models["screened"],
        ids,
        lambda: ScreenedCache(config=models["screened"].config),
        args.new,
        lambda c: c.nbytes(),
    )
    dynamic = run(
        models["sdpa"],
        ids,
        lambda: DynamicCache(config=models["sdpa"].config),
        args.new,
        dynamic_cache_bytes,
    )

    print(
        f"screening_attn {screening_attn.hf.NAME!r}: Llama-shaped, 4 layers, hidden 256, 8 query "
        f"heads, 2 KV heads, fp32; prompt {args.prompt}, {args.new} new tokens, "
        f"window={args.window}, relevant={args.relevant}, threads={args.threads}"
    )
    print(f"{'cache':<14}{'after prefill':>16}{'at the end':>14}{'ms / decode step':>18}")
    for name, (_, per_token, prefill_bytes, end_bytes) in (
        ("ScreenedCache", screened),
        ("DynamicCache", dynamic),
    ):
        print(
            f"{name:<14}{prefill_bytes / 2**10:>13.0f} KiB{end_bytes / 2**10:>11.0f} KiB"
            f"{per_token * 1e3:>18.1f}"
        )
    new_screened, new_dense = screened[0][0, args.prompt :], dynamic[0][0, args.prompt :]
    differ = (new_screened != new_dense).nonzero()
    first = int(differ[0]) if len(differ) else args.new
    print(
        f"the first {first} of {args.new} new tokens equal the dense model's (random weights: "
        f"they part once a key outside the window and the relevant set would have mattered)"
    )


if __name__ == "__main__":
    main()
