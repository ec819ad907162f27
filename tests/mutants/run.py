"""``make mutants``: patch one wrong kernel in at a time (``plugin.py``) and run the tests that
should catch it. Every mutant must be *killed* (its tests fail); a *control* (the plain-PyTorch
re-implementation without the mutation) must survive, or the kills prove nothing.

    python tests/mutants/run.py [--only SUBSTRING ...] [--jobs N] [--out build/mutants.json]
                               [--full-controls]

The mutants run first, each stopping at its first failing test; then each control runs the tests
that killed its target's mutants (``--full-controls``: its whole selection): a kill proves
something exactly when its test passes without the mutation.

Writes a JSON list, one object per mutant: ``mutant``, ``killed``, ``expected`` ("killed", or
"survives" for controls), ``failing_tests``, ``tests_run`` (for a control: the node ids it ran,
or "selection"), ``not_applicable`` (tests skipped because the mutant refuses their call:
grouped heads or padding for the Triton attention mutants), ``seconds``; exits non-zero if any
mutant survives or any control is killed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _files(*patterns: str, exclude: tuple[str, ...] = ("reference", "scan")) -> list[str]:
    """Test files matching the patterns, kernels' tests first (they kill fastest), without the
    references' own tests or the scan emulation's (a kernel mutant cannot reach them)."""
    out: list[str] = []
    for pattern in patterns:
        for f in sorted(glob.glob(str(ROOT / "tests" / pattern))):
            rel = os.path.relpath(f, ROOT)
            if rel not in out and not any(x in Path(rel).name for x in exclude):
                out.append(rel)
    return out


# target -> (test files, -k expression)
# (the C++ ops' own argument checks, which a patched op does not have, are left out as for the
# RNN below)
_CNNF_CPU = "not triton and not attention and not rnn and not lstm and not check_before_converting"
SELECTIONS = {
    "attention-cpu": (
        ("test_attention_*.py", "test_fuzz.py", "test_determinism.py"),
        "attention and not triton",
    ),
    # the Triton mutants model the one-head op without padding: plugin.py skips a grouped or
    # padded call as "not applicable", so the grouped/padded tests would all skip: left out; the
    # stream op's tests run kernels no mutant replaces
    "attention-triton": (
        ("test_attention_*.py", "test_fuzz.py", "test_determinism.py"),
        "attention and triton and not gqa_padding and not stream_triton",
    ),
    # the slot-state validation is host code of the C++ step op (rnn_checks.h), which a mutant
    # replaces, without it: the control would fail those tests, proving nothing
    "rnn-cpu": (
        ("test_rnn_*.py", "test_fuzz.py"),
        "(rnn or lstm) and not cuda and not bad_slot_state",
    ),
    "pool-cpu": (("test_feedback_*.py", "test_fuzz.py"), _CNNF_CPU),
    "pool-triton": (("test_feedback_*.py", "test_fuzz.py"), "triton and not attention"),
    "gate-cpu": (("test_feedback_*.py", "test_fuzz.py"), _CNNF_CPU),
    "gate-triton": (("test_feedback_*.py", "test_fuzz.py"), "triton and not attention"),
}

MUTATIONS = {
    "attention": (
        "ge",
        "tie-high",
        "screen-early",
        "rel-from-set",
        "drop-tail",
        "window-off-by-one",
        "slot-order",
    ),
    "rnn": ("ge", "tie-high"),
    "pool": ("last-index", "shifted-argmax"),
    "gate": ("flip-near-zero",),
}


def mutants() -> list[tuple[str, bool]]:
    """(name, is_control) for every target: its control, each mutation, and each mutation on
    float32 inputs only."""
    out = []
    for target in SELECTIONS:
        family = target.split("-")[0]
        out.append((f"{target}:control", True))
        for m in MUTATIONS[family]:
            out += [(f"{target}:{m}", False), (f"{target}:{m}-f32", False)]
    return out


# Tests of the C++ ops' own argument checks are not about the math the mutants change (and the
# plain-PyTorch kernels do not re-check their inputs).
NOT_CHECKS = "not errors and not check_their_inputs and not checks_its_inputs"


def run_one(name: str, control: bool, tests: list[str] | None = None) -> dict:
    """Run the target's selection (or the node ids ``tests``) with mutant ``name`` patched in."""
    target = name.split(":")[0]
    patterns, expr = SELECTIONS[target]
    expr = f"({expr}) and {NOT_CHECKS}"
    which = tests if tests else [*_files(*patterns), "-k", expr]
    cmd = [sys.executable, "-m", "pytest", *which, "-q", "-p", "no:cacheprovider", "-p",
           "plugin", "--no-header", "-rfs", "--tb=line"]  # fmt: skip
    if not control:
        cmd.append("-x")  # one failure kills it
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "SCREENING_ATTN_MUTANT": name, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    # pytest: 0 all passed, 1 some failed; anything else (errors, no tests) is a harness fault
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{name}: pytest exited {proc.returncode}\n{text[-3000:]}")
    failing = sorted(set(re.findall(r"^FAILED (\S+)", text, flags=re.M)))
    # tests the mutant does not model (plugin.NotModelled): skipped, neither kills nor passes
    skips = re.findall(r"^SKIPPED \[(\d+)\] .*mutant not applicable", text, flags=re.M)
    not_applicable = sum(map(int, skips))
    return {
        "mutant": name,
        "expected": "survives" if control else "killed",
        "killed": proc.returncode == 1,
        "failing_tests": failing,
        "not_applicable": not_applicable,
        "seconds": round(seconds, 1),
        "tests_run": tests or "selection",
        **({"output_tail": text[-2000:]} if (proc.returncode == 1) == control else {}),
    }


def _unbuffered() -> None:
    sys.stdout.reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="*", default=None, help="run mutants whose name has one of these"
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (1 thread each)")
    parser.add_argument("--out", default=str(ROOT / "build" / "mutants.json"))
    parser.add_argument(
        "--full-controls",
        action="store_true",
        help="run each control on its target's whole selection, not only the killing tests",
    )
    args = parser.parse_args(argv)
    _unbuffered()
    todo = [(n, c) for n, c in mutants() if not args.only or any(s in n for s in args.only)]
    start = time.perf_counter()
    results: list[dict] = []

    def report(res: dict) -> None:
        ok = res["killed"] == (res["expected"] == "killed")
        first = res["failing_tests"][0] if res["failing_tests"] else ""
        if res["not_applicable"]:
            first += f" ({res['not_applicable']} not applicable)"
        fate = "killed" if res["killed"] else "survived"
        status = "ok  " if ok else "FAIL"
        print(f"{status} {res['mutant']:<42} {fate:<8} {res['seconds']:6.1f}s {first}", flush=True)
        results.append(res)

    # The mutants first (each stops at its first failure), then each control on the tests that
    # killed its target's mutants: a kill proves something exactly when its test passes without
    # the mutation. A control with no kills to check (run alone) takes the whole selection.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(lambda nc: run_one(*nc), [nc for nc in todo if not nc[1]]):
            report(res)
        killers: dict[str, set[str]] = {}
        for res in results:
            killers.setdefault(res["mutant"].split(":")[0], set()).update(res["failing_tests"])
        controls = [
            (n, True, None if args.full_controls else sorted(killers.get(n.split(":")[0], ())))
            for n, c in todo
            if c
        ]
        for res in pool.map(lambda nct: run_one(*nct), controls):
            report(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r["mutant"] for r in results if r["killed"] != (r["expected"] == "killed")]
    print(f"{len(results) - len(bad)}/{len(results)} as expected in "
          f"{time.perf_counter() - start:.0f} s; {args.out}")  # fmt: skip
    if bad:
        print("not as expected: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
