"""bench/gpu_check.py (``make gpu-check``) on this machine without a GPU: it refuses with a clear
message, and its code paths (arguments, the reference check, timing, table, JSON and plots) run
here on CPU tensors with a tiny shape, so that they are not first exercised on a GPU."""

import json
import os

import pytest
import torch

from bench import gpu_check
from bench._common import CheckFailed

TINY = {"B": 1, "H": 2, "D": 8, "T": 48, "window": 8, "relevant": 4, "device": "cpu"}


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "make gpu-static" in err


def test_arguments_and_plan(monkeypatch):
    a = gpu_check.parse_args([])
    assert (a.quick, a.no_tests, a.no_bench, a.dtype) == (False, False, False, "fp16")
    assert gpu_check.parse_args(["--quick", "--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtype", "fp32"])  # the flash kernels take no float32
    assert [s["T"] for s in gpu_check.shapes(True)] == [1024, 4096]
    assert {s["device"] for s in gpu_check.shapes(False)} == {"cuda"}
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert gpu_check.providers() == ["triton", "triton_sequential", "sdpa_dense"]
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())
    assert gpu_check.providers()[-1] == "flash_window"


def test_the_check_catches_a_wrong_attention():
    """Dense causal SDPA passes against the screened reference with window >= T; the same
    attention passed off as the screened op (window 8) fails."""
    from bench.bench_attention import make_inputs

    q, k, v, g = make_inputs(1, 2, 48, 8, 48, "cpu", requires_grad=True)
    dense = gpu_check.attention_fn("sdpa_dense", 8, 4)
    for mode in ("fwd", "fwd+bwd"):
        gpu_check.check("sdpa_dense", dense, mode, q, k, v, g, TINY, 1e-4)
    with pytest.raises(CheckFailed):
        gpu_check.check("triton", dense, "fwd", q, k, v, g, TINY, 1e-4)


def test_the_sequential_provider_runs_the_sequential_scan(monkeypatch):
    """``triton_sequential`` is the op with the sequential scan (and only for its call): checked
    against the screened reference under the Triton interpreter, the launcher's choice seen."""
    from bench.bench_attention import make_inputs
    from screening_attn._kernels import attention as kernels

    seen = []
    choose = kernels.scan_kernel
    monkeypatch.setattr(kernels, "scan_kernel", lambda: seen.append(choose()) or seen[-1])
    monkeypatch.delenv(gpu_check.SCAN_ENV, raising=False)
    q, k, v, g = make_inputs(1, 2, 48, 8, 48, "cpu", requires_grad=True)
    fn = gpu_check.attention_fn("triton_sequential", 8, 4)
    gpu_check.check("triton_sequential", fn, "fwd", q, k, v, g, TINY, 1e-4)
    assert seen and set(seen) == {"sequential"}
    assert gpu_check.SCAN_ENV not in os.environ


def test_bench_table_json_and_plots(tmp_path):
    """The benchmark loop on the CPU (bfloat16, dense SDPA only), then the table with a faked
    Triton row beside it, and the files ``make gpu-check`` writes."""
    results = gpu_check.run_bench([TINY], "bf16", ["sdpa_dense"], min_time=0.01)
    assert [(r["provider"], r["mode"], r["status"]) for r in results] == [
        ("sdpa_dense", "fwd", "ok"),
        ("sdpa_dense", "fwd+bwd", "ok"),
    ]
    assert all(r["median_s"] > 0 and r["n"] >= 3 for r in results)
    fake = gpu_check.record("triton", "fwd", TINY, "bf16")
    gpu_check.add_timing(fake, gpu_check.Timing(results[0]["median_s"] / 4, 0, 0, 3, [0, 0, 0]))
    text = gpu_check.table([fake, *results])
    assert "sdpa_dense/triton" in text.splitlines()[0]
    assert "4.00x" in text.splitlines()[1]  # fwd: the peer at 4x the faked time
    assert text.splitlines()[2].rstrip().endswith("-")  # fwd+bwd: no triton row to compare
    paths = gpu_check.write([fake, *results], tmp_path, plots=True)
    data = json.loads(paths[0].read_text())
    assert paths[0].name.startswith("gpu-") and len(data["results"]) == 3
    assert {p.suffix for p in paths[1:]} == {".png"} and len(paths) >= 2
