"""The static GPU check (bench/gpu_static.py, ``make gpu-static``) on a quick subset: three cheap
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
    # IEEE float32 products run on FMA units: an mma there would round them to TF32
    assert violations(_record(dtype="fp32", tensor_core_instructions=0)) == []
    assert "TF32" in violations(_record(dtype="fp32", tensor_core_instructions=4))[0]
    # with allow_tf32, on tensor cores: an mma/wgmma on .tf32 operands
    tf32 = _record(dtype="fp32", tf32=True, tensor_core_instructions=8, tf32_instructions=8)
    assert violations(tf32) == []
    assert ".tf32" in violations({**tf32, "tensor_core_instructions": 0, "tf32_instructions": 0})[0]
    assert ".tf32" in violations({**tf32, "tf32_instructions": 0})[0]
    # the replay has no products
    assert violations(_record(kernel="replay", tensor_core_instructions=0)) == []
    assert "build failed" in violations(_record(error="CompilationError: x"))[0]


def test_plan_covers_the_launchers():
    from bench.gpu_static import plan

    builds = plan([80, 90], ["fp16", "bf16", "fp32"], [32, 64, 128, 256], set())
    kinds = {(b["kernel"], b["arch"], b["dtype"], b["head_dim"]) for b in builds}
    for kernel in ("scan", "fwd", "fwd_fix", "dq", "dq_fix", "dkdv", "dkdv_fix"):
        for arch in (80, 90):
            assert (kernel, arch, "bf16", 256) in kinds
    # the replay reads only spans: one build per (arch, dtype, ν-ρ bucket), whatever the head,
    # and one more as a stream step from an initial state
    replay = [b for b in builds if b["kernel"] == "replay"]
    assert {(b["arch"], b["dtype"]) for b in replay} == {
        (a, dt) for a in (80, 90) for dt in ("fp16", "bf16", "fp32")
    }
    assert len(replay) == 24 and all("BLOCK_D" not in b["config"] for b in replay)
    assert sum(b["config"]["HAS_STATE"] for b in replay) == 12
    # every kernel is also built as a stream step (HAS_STATE, with the padding and groups)
    for kernel in ("scan", "fwd", "fwd_fix", "dq", "dq_fix", "dkdv", "dkdv_fix"):
        stream = [b for b in builds if b["kernel"] == kernel and b["config"]["HAS_STATE"]]
        assert stream and all(b["point"]["padded"] and b["point"]["stream"] for b in stream)
    # ν and ρ reach only the scan's lane vectors and the replay's capacity
    assert {b.get("window") for b in builds if b["kernel"] == "scan"} == {64, 1024}
    assert all("window" not in b for b in builds if b["kernel"] in ("fwd", "dq", "dkdv"))
    # no build is specialised on T: no runtime int is a constexpr of the kernels
    assert all("T" not in b["config"] for b in builds)
    # float32 is built IEEE, and with allow_tf32 every kernel whose launch passes it
    ieee = [b for b in builds if b["dtype"] == "fp32"]
    assert ieee and all(not b["config"].get("TF32") and "tf32" not in b for b in ieee)
    tf32 = plan([80, 90], ["tf32"], [32, 64, 128, 256], set())
    assert all(b["dtype"] == "fp32" and b["tf32"] and b["config"]["TF32"] for b in tf32)
    assert {(b["kernel"], b["arch"], b["head_dim"]) for b in tf32} == {
        (k, a, d)
        for k in ("fwd", "fwd_fix", "dq", "dq_fix", "dkdv", "dkdv_fix")
        for a in (80, 90)
        for d in (32, 64, 128, 256)
    }
    # every TF32 point is built plain, padded (grouped heads with a mask) and as a stream step,
    # as the others
    assert {b["point"]["padded"] for b in tf32} == {False, True}
    assert {b["point"].get("stream", False) for b in tf32} == {False, True}

    def plain(builds):
        return [b for b in builds if not b["point"]["padded"]]

    both = plain(plan([80], ["fp32", "tf32"], [256], {"dq"}))
    assert [b["config"]["TF32"] for b in both] == [False, True]
    # IEEE float32 takes S and dP of a 256-wide head 64 columns at a time (FMA units), TF32
    # at once (tensor cores) but in the fix-ups (which spilled)
    assert [b["config"]["BLOCK_K"] for b in both] == [64, 256]
    fix = plain(plan([80], ["fp32", "tf32"], [256], {"dq_fix", "dkdv_fix"}))
    assert [b["config"]["BLOCK_K"] for b in fix] == [64] * 4


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
    """Compile the output kernel (fp16, D=32: tensor cores), the replay and the output kernel
    in float32 with allow_tf32 (TF32 tensor cores) for sm_80 in a process without
    TRITON_INTERPRET, as ``make gpu-static`` does; ``--merge`` keeps the records of ``--out``
    that a run does not rebuild."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gpu-static.json"
    from bench.gpu_static import plan

    # a build of the sweep that this run does not make (values made up), and a stale one
    kept, _padded, _stream = plan([90], ["bf16"], [64], {"dq"})
    kept = _record(**kept, violations=[])
    stale = _record(kernel="dq", family="attention", config={"BLOCK_M": 1}, violations=[])
    out.write_text(json.dumps([kept, stale]))
    args = ["--kernel", "fwd,replay", "--dtype", "fp16,tf32", "--head-dim", "32", "--arch", "80"]
    args += ["--small-only", "--jobs", "1", "--no-cache", "--merge", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_static", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    old, *new = json.loads(out.read_text())
    assert old == kept
    assert not kept["point"]["padded"]
    # the output kernel also as launched with grouped heads and a padding mask, and as a
    # stream step (the replay does not depend on the padding and groups: two builds)
    points = [(r["kernel"], r["dtype"], r["point"]["padded"], r["point"].get("stream", False))
              for r in new]  # fmt: skip
    assert sorted(points) == [
        ("fwd", "fp16", False, False), ("fwd", "fp16", True, False), ("fwd", "fp16", True, True),
        ("fwd", "fp32", False, False), ("fwd", "fp32", True, False), ("fwd", "fp32", True, True),
        ("replay", "fp16", False, False), ("replay", "fp16", True, True),
    ]  # fmt: skip
    recs = {(rec["kernel"], rec["dtype"]): rec for rec in new if not rec["point"]["padded"]}
    for rec in recs.values():
        assert rec["violations"] == []
        assert 0 < rec["shared_bytes"] <= 163 * 1024 and 0 < rec["registers"] <= 255
        assert rec["build_s"] > 0
    fp16, tf32 = recs["fwd", "fp16"], recs["fwd", "fp32"]
    assert fp16["tensor_core_instructions"] > 0
    assert fp16["config"]["BLOCK_D"] == 32 and fp16["config"]["NATIVE"] is True
    assert "tf32" not in fp16 and tf32["tf32"] is True and tf32["config"]["TF32"] is True
    # every product of the TF32 build on tensor cores: mma.sync ... .tf32.tf32 on sm_80
    assert tf32["tf32_instructions"] == tf32["tensor_core_instructions"] > 0


def test_merge():
    """``--merge``: a rebuilt record replaces the kept one in place, new ones follow, stale ones
    go."""
    from bench.gpu_static import merge

    a, b = _record(config={"BLOCK_M": 16}), _record(config={"BLOCK_M": 32})
    a2, c = {**a, "build_s": 2.0}, _record(config={"BLOCK_M": 16}, dtype="bf16")
    assert merge([a, b], [c, a2]) == [a2, b, c]
    assert merge([], [a]) == [a] and merge([a], []) == [a]
    # a build the launchers no longer make (its configuration changed) is dropped
    from bench.gpu_static import _identity

    assert merge([a, b], [c], {_identity(x) for x in (b, c)}) == [b, c]


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
