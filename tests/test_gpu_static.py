"""The static GPU check (bench/gpu_static.py, ``make gpu-static``) on a quick subset: two cheap
sm_80 builds compiled here, without a GPU, and the limits it enforces. The full sweep is
``make gpu-static``; its last result is bench/results/gpu-static.json."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


def _record(**kw):
    rec = {
        "kernel": "fwd", "arch": 80, "dtype": "fp16", "head_dim": 64, "shared_bytes": 1024,
        "registers": 128, "spill_bytes": 0, "tensor_core_instructions": 8, "build_s": 1.0,
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_violations():
    from bench.gpu_static import violations

    assert violations(_record()) == []
    assert violations(_record(arch=90, shared_bytes=200 * 1024)) == []
    assert "shared" in violations(_record(arch=80, shared_bytes=200 * 1024))[0]
    assert "shared" in violations(_record(arch=90, shared_bytes=228 * 1024))[0]
    assert "stack" in violations(_record(spill_bytes=7408))[0]
    assert "mma" in violations(_record(dtype="bf16", tensor_core_instructions=0))[0]
    # float32 products may run on FMA units (IEEE by default); the replay has no products
    assert violations(_record(dtype="fp32", tensor_core_instructions=0)) == []
    assert violations(_record(kernel="replay", tensor_core_instructions=0)) == []
    assert "build failed" in violations(_record(error="CompilationError: x"))[0]


def test_plan_covers_the_launchers():
    from bench.gpu_static import plan

    builds = plan([80, 90], ["fp16", "bf16", "fp32"], [32, 64, 128, 256], set())
    kinds = {(b["kernel"], b["arch"], b["dtype"], b["head_dim"]) for b in builds}
    for kernel in ("scan", "fwd", "fwd_fix", "dq", "dq_fix", "dkdv", "dkdv_fix"):
        for arch in (80, 90):
            assert (kernel, arch, "bf16", 256) in kinds
    # the replay reads only spans: one build per (arch, dtype, ν-ρ bucket), whatever the head
    replay = [b for b in builds if b["kernel"] == "replay"]
    assert {(b["arch"], b["dtype"]) for b in replay} == {
        (a, dt) for a in (80, 90) for dt in ("fp16", "bf16", "fp32")
    }
    assert len(replay) == 12 and all("BLOCK_D" not in b["config"] for b in replay)
    # ν and ρ reach only the scan's lane vectors and the replay's capacity
    assert {b.get("window") for b in builds if b["kernel"] == "scan"} == {64, 1024}
    assert all("window" not in b for b in builds if b["kernel"] in ("fwd", "dq", "dkdv"))
    # no build is specialised on T: no runtime int is a constexpr of the kernels
    assert all("T" not in b["config"] for b in builds)


def test_plan_takes_registered_families(monkeypatch):
    """A second kernel family registers a (points, builds) pair in FAMILIES: its builds are
    planned (deduplicated by constexprs, filtered by --family / --kernel) and rebuilt from
    their records."""
    from bench import gpu_static

    def points(archs, dtypes, head_dims, windows):
        for arch in archs:
            for dt in dtypes:  # twice: the same constexprs build once
                yield {"arch": arch, "dtype": dt, "width": 2}
                yield {"arch": arch, "dtype": dt, "width": 2}

    def builds(arch, dtype, width):
        return [("a", "fn_a", {}, {"W": width, "D": dtype}, {"num_warps": 4}),
                ("b", "fn_b", {}, {"W": width}, {"num_warps": 4})]  # fmt: skip

    monkeypatch.setitem(gpu_static.FAMILIES, "toy", (points, builds))
    recs = gpu_static.plan([80, 90], ["fp16", "fp32"], [32], set(), families={"toy"})
    assert len(recs) == 8 and {(r["family"], r["kernel"], r["arch"], r["dtype"]) for r in recs} == {
        ("toy", k, arch, dt) for k in "ab" for arch in (80, 90) for dt in ("fp16", "fp32")
    }
    assert all(r["head_dim"] is None and r["config"]["W"] == 2 for r in recs)
    assert gpu_static._spec(recs[0])[1] == "fn_a"
    assert [
        r["kernel"] for r in gpu_static.plan([80], ["fp16"], [32], {"b"}, families={"toy"})
    ] == ["b"]
    attention = gpu_static.plan([80], ["fp16"], [32], set(), families={"attention"})
    assert attention and all(r["family"] == "attention" for r in attention)


def test_quick_builds(tmp_path):
    """Compile the output kernel (fp16, D=32: tensor cores) and the replay for sm_80 in a
    process without TRITON_INTERPRET, as ``make gpu-static`` does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gpu-static.json"
    args = ["--kernel", "fwd,replay", "--dtype", "fp16", "--head-dim", "32", "--arch", "80"]
    args += ["--small-only", "--jobs", "1", "--no-cache", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_static", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    recs = {rec["kernel"]: rec for rec in json.loads(out.read_text())}
    assert set(recs) == {"fwd", "replay"}
    for rec in recs.values():
        assert rec["violations"] == []
        assert 0 < rec["shared_bytes"] <= 163 * 1024 and 0 < rec["registers"] <= 255
        assert rec["build_s"] > 0
    assert recs["fwd"]["tensor_core_instructions"] > 0
    assert recs["fwd"]["config"]["BLOCK_D"] == 32 and recs["fwd"]["config"]["NATIVE"] is True


def test_plan_covers_the_feedback_launchers():
    """Every CNN-F kernel in each dtype and arch, the norm kernels in every gate the ops use and
    both plane blocks; no size of a tensor is a constexpr (one build per variant, not per shape)."""
    from bench.gpu_static import plan
    from screening_attn._kernels import feedback

    builds = plan([80, 90], ["fp16", "bf16", "fp32"], [], set(), families={"feedback"})
    kernels = {b["kernel"] for b in builds}
    assert kernels == {
        "feedback.ada_relu", "feedback.ada_relu_backward", "feedback.ada_relu_feedback",
        "feedback.ins_norm_fwd", "feedback.ins_norm_bwd", "feedback.ada_pool2d",
        "feedback.ada_unpool2d", "feedback.ada_pool2d_gather",
    }  # fmt: skip
    fwd = [b["config"] for b in builds if b["kernel"] == "feedback.ins_norm_fwd"]
    assert {c["GATE"] for c in fwd} == {int(g) for g in feedback.Gate}
    assert {c["BLOCK"] for c in fwd} == set(feedback.PLANE_BLOCKS)
    assert {feedback.plane_block(n) for n in (1, 49, 256, 257, 784, 1 << 20)} == {256, 1024}
    sizes = {"n", "C", "total", "H", "W", "Ho", "Wo", "K"}
    assert all(not sizes & set(b["config"]) for b in builds)
    # per arch and dtype: 2 + 1 + 1 gates, 6 (gate, bias) x 2 x 2 and 6 x 2 x 2 norms, 3 x 2 pools
    per_target = Counter((b["arch"], b["dtype"]) for b in builds)
    assert len(per_target) == 6 and set(per_target.values()) == {4 + 24 + 24 + 6}


def test_quick_feedback_builds(tmp_path):
    """The gated AdaReLU and the centered, gated InsNorm·Bias·AdaReLU forward (the largest
    plane block) in bfloat16 for sm_90, compiled here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gpu-static.json"
    args = ["--family", "feedback", "--kernel", "feedback.ada_relu,feedback.ins_norm_fwd"]
    args += ["--dtype", "bf16", "--arch", "90", "--jobs", "1", "--no-cache", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_static", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    recs = json.loads(out.read_text())
    assert {rec["kernel"] for rec in recs} == {"feedback.ada_relu", "feedback.ins_norm_fwd"}
    assert len(recs) == 2 + 24  # ada_relu gated or not; 6 gates x centered x 2 blocks
    for rec in recs:
        assert rec["violations"] == [] and rec["head_dim"] is None
        assert rec["shared_bytes"] <= 227 * 1024 and 0 < rec["registers"] <= 255
        assert rec["spill_bytes"] == 0 and rec["build_s"] > 0
