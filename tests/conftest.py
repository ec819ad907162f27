import os

# The Triton interpreter must be chosen before anything imports triton.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from _env import PROFILE
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Hypothesis profiles, picked by HYPOTHESIS_PROFILE: "ci" (the default, what `make test` runs)
# draws fixed examples (derandomize) so that every run checks the same cases and a failure
# reproduces; "fuzz" (`make fuzz`) draws new random examples each run, FUZZ_FACTOR times as many
# in tests/test_fuzz.py, and keeps failing ones in .hypothesis/ (git-ignored) to replay first.
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile(
    "fuzz",
    deadline=None,
    database=DirectoryBasedExampleDatabase(
        os.path.join(os.path.dirname(__file__), os.pardir, ".hypothesis", "examples")
    ),
    print_blob=True,
)
settings.load_profile(PROFILE)


@pytest.fixture(autouse=True)
def _restore_rng():
    """Each test starts from a fixed seed and leaves the global RNG as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)
