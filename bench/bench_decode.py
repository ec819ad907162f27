"""The ``decode`` family: greedy decoding of a transformers model, one token per timed call,
after a context of ``context`` positions, with three caches (bench/README.md, issue #14 item 5).

The model is a Llama-shaped ``MistralForCausalLM`` built from a config (random weights, float32;
Mistral is Llama's architecture plus ``sliding_window``, so all three providers run the same
weights and differ only in attention and cache):

* ``screened``: ``attn_implementation="screened"`` with ``screening_attn.hf.ScreenedCache``
  (ν = ``window``, ρ = ``relevant``; the C++ kernel streams each token);
* ``sdpa_dynamic``: sdpa with ``DynamicCache``, every key kept (dense attention);
* ``sdpa_window``: sdpa with ``sliding_window = ν + ρ`` and ``DynamicCache(config=...)``, whose
  layers are ``DynamicSlidingWindowLayer``: each token attends to the ν + ρ newest keys, the
  screened op's key budget.

The context is built without running the model over it: every layer's cache gets the same
random keys and values (and the screened layers the queries to screen them with, through the
kernel), ``context`` positions of them. A decode step's cost and the cache's memory depend on how
much the cache holds, not on what, and the dense model's prefill at 32k positions would take
minutes on this CPU; position ids still continue at ``context`` (the caches count positions
seen). Correctness of the three paths against full forwards is tests/test_hf.py's business; the
setup checks what the timing depends on: each cache holds what it should after the context.

A timed call is one decode step: the model's forward of one token with the cache, then the
argmax, which is the next call's token. Each call grows the context by one position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench._common import CheckFailed, Unavailable

# The model's MLP width (Llama's ratio to hidden 512) and vocabulary; the case's shape gives
# layers, hidden size and heads (bench/_cases.py: 4, 512, 8 query and 2 KV heads of 64).
INTERMEDIATE = 1408
VOCAB = 32000
FAMILY = "decode"
PROVIDERS = ("screened", "sdpa_dynamic", "sdpa_window")


def _config(provider: str, window: int, relevant: int, model: dict):
    from transformers import MistralConfig

    sliding = window + relevant if provider == "sdpa_window" else None
    config = MistralConfig(
        vocab_size=model["vocab"],
        hidden_size=model["hidden"],
        intermediate_size=model["intermediate"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        num_key_value_heads=model["kv_heads"],
        head_dim=model["hidden"] // model["heads"],
        max_position_embeddings=1 << 20,
        sliding_window=sliding,
        attention_dropout=0.0,
    )
    config.screening_window, config.screening_relevant = window, relevant
    return config


def cache_nbytes(cache) -> int:
    """Bytes of the storages a transformers cache's tensors keep alive, each counted once (a
    sliding layer's keys are a view of a larger tensor: the storage is what memory holds)."""
    if hasattr(cache, "nbytes"):  # ScreenedCache
        return int(cache.nbytes())
    storages: dict[int, int] = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def stored_per_layer(cache) -> list[int]:
    """Per layer, the keys held per (batch row, KV head)."""
    if hasattr(cache, "stored"):  # ScreenedCache
        return list(cache.stored())
    return [0 if layer.keys is None else int(layer.keys.shape[-2]) for layer in cache.layers]


def _fill_context(provider: str, model, cache, context: int, B: int, seed: int) -> None:
    """Put ``context`` positions of random keys and values (the same for every provider) into
    every layer of ``cache``; the screened layers screen them with random queries."""
    config = model.config
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator().manual_seed(seed)
    for i, attn in enumerate(layer.self_attn for layer in model.model.layers):
        k = torch.randn(B, Hkv, context, D, generator=gen)
        v = torch.randn(B, Hkv, context, D, generator=gen)
        q = torch.randn(B, H, context, D, generator=gen)
        if provider == "screened":
            layer = cache.layers[i]
            layer.update(k, v)
            layer.attend(q, k, v, None, attn.scaling)
        else:
            cache.update(k, v, i)


def setup_decode(
    provider: str,
    mode: str,
    *,
    context: int,
    window: int,
    relevant: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int = INTERMEDIATE,
    vocab: int = VOCAB,
    B: int = 1,
    seed: int = 0,
) -> Callable[[], None]:
    """One greedy decode step of ``provider`` after a ``context``-position context, batch ``B``.

    Returns the step; its ``record()`` gives the cache's bytes and per-layer key counts after
    the context and one step (``cache_bytes``, ``stored``), the bytes right after the context
    (``cache_bytes_context``), and after the timed steps (``cache_bytes_end``, ``stored_end``,
    ``positions_end``)."""
    if provider not in PROVIDERS:
        raise Unavailable(f"unknown decode provider {provider!r}")
    if mode != "decode":
        raise Unavailable(f"the decode family has one mode, 'decode', not {mode!r}")
    try:
        from transformers import DynamicCache, MistralForCausalLM

        from screening_attn.hf import NAME, ScreenedCache
    except ImportError as exc:
        raise Unavailable(f"needs transformers (pip install screening_attn[hf]): {exc}") from exc

    torch.manual_seed(seed)  # the same weights for every provider
    shape = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads}
    config = _config(
        provider, window, relevant, {**shape, "intermediate": intermediate, "vocab": vocab}
    )
    implementation = NAME if provider == "screened" else "sdpa"
    model = MistralForCausalLM._from_config(config, attn_implementation=implementation)
    model.eval()
    if provider == "screened":
        cache = ScreenedCache(config=model.config)
    elif provider == "sdpa_window":
        cache = DynamicCache(config=model.config)
    else:
        cache = DynamicCache()
    with torch.inference_mode():
        _fill_context(provider, model, cache, context, B, seed)
    stored = stored_per_layer(cache)
    expected = {
        "screened": window - 1 + relevant,
        "sdpa_dynamic": context,
        "sdpa_window": min(context, window + relevant - 1),
    }[provider]
    too_many = stored[0] > expected if provider == "screened" else stored[0] != expected
    if cache.get_seq_length() != context or too_many or len(set(stored)) != 1:
        raise CheckFailed(
            f"after a context of {context}: seq length {cache.get_seq_length()}, keys per layer "
            f"{stored}, expected {'<= ' if provider == 'screened' else ''}{expected}"
        )
    context_bytes = cache_nbytes(cache)
    with torch.inference_mode():  # one step outside the timed region, checked
        out = model(input_ids=torch.zeros(B, 1, dtype=torch.long), cache=cache, logits_to_keep=1)
    if not torch.isfinite(out.logits).all():
        raise CheckFailed("non-finite logits after the context")
    token = out.logits[:, -1:].argmax(-1)
    # Memory is counted after that first step: right after a prefill, a sliding-window layer's
    # keys are a view of the whole prefill's keys, which stay alive until its next update.
    info = {
        "cache_bytes": cache_nbytes(cache),
        "stored": stored_per_layer(cache),
        "cache_bytes_context": context_bytes,
    }

    def step() -> None:
        nonlocal token
        with torch.inference_mode():
            out = model(input_ids=token, cache=cache, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)

    def record() -> dict:
        return {
            **info,
            "cache_bytes_end": cache_nbytes(cache),
            "stored_end": stored_per_layer(cache),
            "positions_end": cache.get_seq_length(),
        }

    step.record = record  # type: ignore[attr-defined]
    step.check = "cache size after the context"  # type: ignore[attr-defined]
    return step


SETUPS = {"decode": setup_decode}


def flops(op: str, provider: str, mode: str, shape: dict) -> float | None:
    """No FLOP model: a decode step is dominated by fixed-size matrix-vector products."""
    return None


def test_decode(benchmark, case):
    from bench._common import run_pytest_benchmark

    run_pytest_benchmark(benchmark, case, SETUPS[case.op])
