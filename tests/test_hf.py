"""``screening_attn.hf`` in tiny transformers models built from configs (random weights,
float64, nothing downloaded): Llama with grouped heads, Qwen2, Mistral (docs/streaming.md).

Oracles: the same model without a cache (``use_cache=False``, screened attention over the whole
sequence at every step), Mistral's sliding-window sdpa model (``relevant=0``), the dense sdpa
model (``relevant >= T``), and each row of a padded batch alone.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the [hf] extra; pinned in requirements-dev

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from screening_attn.hf import ScreenedCache  # noqa: E402

WINDOW, RELEVANT, VOCAB = 4, 3, 64
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)
CONFIGS = {
    "llama-gqa": lambda **kw: LlamaConfig(**TINY | kw),
    "qwen2": lambda **kw: Qwen2Config(**TINY | {"num_key_value_heads": 4} | kw),
    "mistral": lambda **kw: MistralConfig(**TINY | {"sliding_window": None} | kw),
}
EXACT = dict(rtol=1e-10, atol=1e-10)


def make_model(arch, attn="screened", window=WINDOW, relevant=RELEVANT, seed=0, **kw):
    """A tiny float64 model; the same ``seed`` gives the same weights whatever ``attn``."""
    config = CONFIGS[arch](**kw)
    config.screening_window, config.screening_relevant = window, relevant
    torch.manual_seed(seed)
    # from_config keeps and mutates the config object: give it its own copy
    model = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attn, dtype=torch.float64
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def tokens(B, T, seed=0):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kw):
    kw = dict(max_new_tokens=12, do_sample=False) | kw
    with torch.no_grad():
        return model.generate(ids, **kw)


def assert_bounded(cache, window=WINDOW, relevant=RELEVANT):
    assert cache.stored() and all(0 < s <= window - 1 + relevant for s in cache.stored())


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_generate_with_cache_equals_without(arch):
    """Greedy tokens and per-step scores with ``ScreenedCache`` equal those of the model
    recomputing the whole sequence at every step; every layer stays within ν-1+ρ keys."""
    model = make_model(arch)
    ids = tokens(2, 10)
    cache = ScreenedCache(config=model.config)
    a = generate(model, ids, cache=cache, output_scores=True, return_dict_in_generate=True)
    b = generate(model, ids, use_cache=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), **EXACT)
    assert cache.get_seq_length() == 10 + 12 - 1  # positions seen; the last token is not fed
    assert_bounded(cache)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_prefill_and_steps_reproduce_the_full_forward(arch):
    """Chunked prefill (5 + 3 positions) then single-token steps: every position's logits equal
    those of one forward over the whole sequence."""
    model = make_model(arch)
    ids = tokens(2, 20, seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = ScreenedCache(config=model.config)
        bounds = [0, 5, 8, *range(9, 21)]
        pieces = [
            model(ids[:, a:b], cache=cache, use_cache=True).logits
            for a, b in itertools.pairwise(bounds)
        ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **EXACT)
    assert cache.get_seq_length() == 20
    assert cache.stored() == [WINDOW - 1 + RELEVANT] * 2


def test_relevant_zero_is_mistral_sliding_window():
    """``relevant=0``: the sliding-window sdpa Mistral of width ν, forward and generate."""
    ours = make_model("mistral", relevant=0, sliding_window=WINDOW)
    sdpa = make_model("mistral", attn="sdpa", relevant=0, sliding_window=WINDOW)
    ids = tokens(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, use_cache=False).logits, sdpa(ids, use_cache=False).logits, **EXACT
        )
    a = generate(ours, ids, cache=ScreenedCache(config=ours.config))
    b = generate(sdpa, ids, cache=DynamicCache(config=sdpa.config))
    assert torch.equal(a, b)


def test_relevant_at_least_T_is_dense_attention():
    """``relevant >= T``: nothing is ever screened out, the dense sdpa model."""
    T, new = 12, 8
    ours = make_model("llama-gqa", relevant=T + new)
    sdpa = make_model("llama-gqa", attn="sdpa")
    ids = tokens(2, T, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, use_cache=False).logits, sdpa(ids, use_cache=False).logits, **EXACT
        )
    a = generate(ours, ids, cache=ScreenedCache(config=ours.config), max_new_tokens=new)
    b = generate(sdpa, ids, max_new_tokens=new)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral"])
def test_left_padded_batch_equals_each_row_alone(arch):
    """Prompts of 6 and 11 tokens, left-padded: each row generates what it generates alone,
    with the same scores."""
    model = make_model(arch)
    rows = [tokens(1, 6, seed=4), tokens(1, 11, seed=5)]
    T = 11
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - r.shape[1] :] = r[0]
        mask[b, T - r.shape[1] :] = 1
    kw = dict(output_scores=True, return_dict_in_generate=True)
    batch = generate(
        model, ids, attention_mask=mask, cache=ScreenedCache(config=model.config), **kw
    )
    for b, r in enumerate(rows):
        alone = generate(model, r, cache=ScreenedCache(config=model.config), **kw)
        assert torch.equal(batch.sequences[b, T:], alone.sequences[0, r.shape[1] :])
        torch.testing.assert_close(
            torch.stack(batch.scores)[:, b], torch.stack(alone.scores)[:, 0], **EXACT
        )


def test_beam_search():
    """Beam search reorders the cache's rows every step: same beams as without a cache."""
    model = make_model("llama-gqa")
    ids = tokens(2, 8, seed=6)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8)
    cache = ScreenedCache(config=model.config)
    a = generate(model, ids, cache=cache, **kw)
    b = generate(model, ids, use_cache=False, **kw)
    assert torch.equal(a, b)
    assert_bounded(cache)


def test_second_turn_on_the_same_cache():
    """A second ``generate`` on the same cache continues the stream: the first turn's output
    plus a new user turn gives the tokens of the whole conversation run without a cache."""
    model = make_model("qwen2")
    cache = ScreenedCache(config=model.config)
    first = generate(model, tokens(1, 7, seed=7), cache=cache, max_new_tokens=6)
    turn2 = torch.cat([first, tokens(1, 5, seed=8)], dim=1)
    a = generate(model, turn2, cache=cache, max_new_tokens=6)
    b = generate(model, turn2, use_cache=False, max_new_tokens=6)
    assert torch.equal(a, b)
    assert cache.get_seq_length() == turn2.shape[1] + 6 - 1
    assert_bounded(cache)


def test_config_without_screening_fields_names_them():
    config = LlamaConfig(**TINY)
    with pytest.raises(ValueError, match=r"set config.screening_window and config.screening_rel"):
        ScreenedCache(config=config)
    config.screening_window = 4
    with pytest.raises(ValueError, match=r"set config.screening_relevant \(ints"):
        ScreenedCache(config=config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="screened")
    with pytest.raises(ValueError, match=r"set config.screening_relevant"):
        model(tokens(1, 4), use_cache=False)


def test_misuse_raises():
    model = make_model("llama-gqa")
    ids = tokens(2, 6, seed=9)
    # the default DynamicCache hands the attention all keys but only the new queries
    with pytest.raises(ValueError, match=r"pass cache=ScreenedCache\(config=model.config\)"):
        generate(model, ids, max_new_tokens=3)
    # a cache made for other screening sizes
    other = copy.deepcopy(model.config)
    other.screening_relevant = RELEVANT + 1
    with pytest.raises(ValueError, match=r"ScreenedCache was made for .*screening_relevant=4"):
        generate(model, ids, cache=ScreenedCache(config=other), max_new_tokens=3)
    # a cache holding a stream of another batch size
    cache = ScreenedCache(config=model.config)
    generate(model, ids, cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"batch size 2, got 1"):
        with torch.no_grad():
            model(ids[:1, :3], cache=cache, use_cache=True)
