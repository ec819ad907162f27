"""The decode benchmark family (bench/bench_decode.py) at tiny sizes: each cache holds what it
should, the memory accounting counts the bytes the cache keeps alive, and the report's path
(scheduling, ratios, tables, targets, plot) carries the figures through."""

import io

import pytest

pytest.importorskip("transformers")

from bench import _cases, bench_decode, plots, tables, targets
from bench.ratios import add_ratios
from bench.run import Progress, run_group

WINDOW, RELEVANT = 8, 4
MODEL = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "intermediate": 48, "vocab": 64}
D = MODEL["hidden"] // MODEL["heads"]
FLOAT = 4  # bytes of a float32


def _setup(provider: str, context: int):
    return bench_decode.setup_decode(
        provider, "decode", context=context, window=WINDOW, relevant=RELEVANT, **MODEL
    )


def _kv_bytes(keys: int) -> int:
    """Keys and values of ``keys`` positions in every layer, batch 1, float32."""
    return MODEL["layers"] * 2 * MODEL["kv_heads"] * keys * D * FLOAT


def test_dynamic_cache_grows_by_one_position_per_step():
    step = _setup("sdpa_dynamic", 40)
    rec = step.record()
    assert rec["stored"] == [41] * MODEL["layers"]  # the context and the checked first step
    assert rec["cache_bytes"] == _kv_bytes(41)
    for _ in range(3):
        step()
    rec = step.record()
    assert rec["positions_end"] == 44 and rec["stored_end"] == [44] * MODEL["layers"]
    assert rec["cache_bytes_end"] == _kv_bytes(44)


def test_sliding_window_cache_keeps_the_key_budget():
    budget = WINDOW + RELEVANT
    step = _setup("sdpa_window", 40)
    rec = step.record()
    assert rec["stored"] == [budget - 1] * MODEL["layers"]
    # after a prefill the kept keys are a view of the whole context's: counted by storage
    assert rec["cache_bytes_context"] == _kv_bytes(40)
    # after a step, the storage is the cat of the kept keys and the new one
    assert rec["cache_bytes"] == _kv_bytes(budget)
    step()
    assert step.record()["cache_bytes_end"] == _kv_bytes(budget)


def test_screened_cache_memory_is_constant_in_the_context():
    short, long = _setup("screened", 30), _setup("screened", 120)
    a, b = short.record(), long.record()
    assert max(a["stored"]) <= WINDOW - 1 + RELEVANT
    assert max(b["stored"]) <= WINDOW - 1 + RELEVANT
    assert a["cache_bytes"] == b["cache_bytes"] > 0
    for _ in range(5):
        long()
    rec = long.record()
    assert rec["positions_end"] == 126 and rec["cache_bytes_end"] == b["cache_bytes"]


def test_report_path_carries_time_and_memory(tmp_path):
    results = []
    for context in (20, 60):
        shape = {"context": context, "window": WINDOW, "relevant": RELEVANT, **MODEL}
        group = [
            _cases._make("decode", "decode", provider, "decode", shape)
            for provider in _cases.DECODE_PROVIDERS
        ]
        timing = {"min_time": 1e9, "max_reps": 3, "warmup_time": 0.0}
        results += run_group(group, timing, Progress(len(group)), 0)
    assert [r["status"] for r in results] == ["ok"] * 6
    for r in results:
        assert r["n"] == 3 and r["median_s"] > 0 and r["check"] == "cache size after the context"
        assert r["cache_bytes"] > 0
    dynamic = [r for r in results if r["provider"] == "sdpa_dynamic"]
    assert dynamic[1]["cache_bytes"] == _kv_bytes(61) > dynamic[0]["cache_bytes"]

    add_ratios(results, mm_gflops=1.0)
    screened = results[3]
    assert screened["provider"] == "screened"
    assert screened["ratios"]["vs_dynamic"] == pytest.approx(
        dynamic[1]["median_s"] / screened["median_s"]
    )
    out = io.StringIO()
    tables.print_tables(results, out)
    assert "cache MB" in out.getvalue() and "xdynamic" in out.getvalue()

    items = targets.targets(results)
    assert [t["family"] for t in items] == ["decode"] * 4
    assert all(t["status"] in ("PASS", "MISS") for t in items)
    memory = next(t for t in items if "memory" in t["name"])
    assert memory["value"] == 1.0 and memory["status"] == "PASS"

    paths = plots.write_plots(results, tmp_path / "run")
    assert [p.name for p in paths] == ["run-decode.png"] and paths[0].stat().st_size > 0


def test_cases_and_timing_per_preset():
    for preset in _cases.PRESETS:
        cs = _cases.cases(preset, ["decode"])
        assert {c.provider for c in cs} == set(_cases.DECODE_PROVIDERS)
        assert sorted({c.kwargs["context"] for c in cs}) == list(_cases.DECODE_CONTEXT[preset])
        assert _cases.timing(cs[0], preset) == _cases.DECODE_TIMING[preset]
    assert 32768 in _cases.DECODE_CONTEXT["full"]
