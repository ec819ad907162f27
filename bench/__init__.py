"""Benchmarks of screening_attn: per-family cases (``bench_<family>.py``), the shared sweeps
(``_cases.py``), the report (``python -m bench.report``) and README.md's results section
(``python -m bench.readme``). bench/README.md lists every module."""
