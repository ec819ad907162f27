"""pytest-benchmark entry: ``pytest bench/ --benchmark-only [--bench-preset quick|default|full]``.

The bench files are named ``bench_*.py`` so that a plain ``pytest`` (testpaths = tests) never
collects them; this conftest, loaded only when bench/ is on the command line, collects them and
parametrizes each family's ``test_<family>(benchmark, case)`` over the preset's cases.
"""

import pytest
import torch

from bench import _cases


def pytest_addoption(parser):
    parser.addoption(
        "--bench-preset",
        default="quick",
        choices=_cases.PRESETS,
        help="sweep of the bench/ cases (default: quick)",
    )
    parser.addoption(
        "--bench-threads", type=int, default=1, help="torch threads for bench/ (default: 1)"
    )


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--bench-threads"))


def pytest_collect_file(file_path, parent):
    # files named on the command line are collected by pytest itself
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        family = metafunc.module.FAMILY
        preset = metafunc.config.getoption("--bench-preset")
        cases = _cases.cases(preset, [family])
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
