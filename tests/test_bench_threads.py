"""The report's 1 -> 2 thread section (bench/threads.py), on a tiny RelRNN: each thread count
times in a worker process of its own, the record and the target come out of it, and a case that
cannot be set up is reported, not raised."""

import io

import pytest

from bench import _cases, targets, threads

TINY = {"B": 2, "input_size": 4, "hidden": 8, "window": 2, "relevant": 2, "T": 8}


def test_each_thread_count_is_timed_in_its_own_worker():
    tc = threads.ThreadCase("tiny RelRNN", threads._case("rnn", "rel_rnn", TINY), 1.3)
    rec = threads.measure(tc, min_time=0.0, min_reps=2, max_reps=2)
    # "ok" only if each worker reported torch.get_num_threads() equal to its count
    assert rec["status"] == "ok", rec["reason"]
    assert rec["shape"] == TINY and rec["mode"] == "fwd+bwd" and rec["provider"] == "cpu"
    t1, t2 = rec["times"]["1"], rec["times"]["2"]
    assert t1["n"] == t2["n"] == 2
    assert 0 < t1["q1_s"] <= t1["median_s"] <= t1["q3_s"]
    assert rec["speedup"] == pytest.approx(t1["median_s"] / t2["median_s"])
    (item,) = targets.thread_targets([rec])
    assert item["family"] == "threads" and item["value"] == rec["speedup"]
    assert item["status"] == ("PASS" if rec["speedup"] >= 1.3 else "MISS")
    out = io.StringIO()
    threads.print_threads([rec], out=out)
    assert "tiny RelRNN" in out.getvalue() and f"{rec['speedup']:.2f}x" in out.getvalue()
    assert len(rec["loadavg"]) == 3


def test_a_busy_machine_is_flagged():
    recs = [{"loadavg": [0.3, 0.2, 0.1]}, {"loadavg": [1.6, 1.0, 0.5]}, {"loadavg": None}]
    assert threads.busy(recs[:1], cores=2) is None
    assert threads.busy(recs, cores=2) == 1.6
    assert threads.busy(recs, cores=4) is None


def test_a_case_that_fails_its_setup_is_reported():
    shape = {k: v for k, v in TINY.items() if k != "T"}
    tc = threads.ThreadCase("no T", threads._case("rnn", "rel_rnn", shape), 1.3)
    rec = threads.measure(tc, min_time=0.0, min_reps=1, max_reps=1)
    assert rec["status"] == "failed" and "KeyError" in rec["reason"]
    assert "times" not in rec
    (item,) = targets.thread_targets([rec])
    assert item["status"] == "not measured" and "KeyError" in item["note"]


@pytest.mark.parametrize("preset", _cases.PRESETS)
def test_every_family_has_a_thread_case(preset):
    assert {tc.case.family for tc in threads.CASES[preset]} == set(_cases.FAMILIES)
    assert all(tc.case.provider == "cpu" for tc in threads.CASES[preset])
