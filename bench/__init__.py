"""Benchmarks of screening_attn: per-family cases (``bench_<family>.py``), the shared sweeps
(``_cases.py``) and the report (``python -m bench.report``). See bench/README.md."""
