"""One tolerance table for every test (DESIGN.md, Tests)."""

import torch

# (rtol, atol) for comparing a backend with the reference run in the same dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
}


def assert_close(actual, expected, dtype=None, **kw):
    dtype = dtype or expected.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kw)


def assert_low_precision_close(actual, expected64, ref_lowp):
    """fp16/bf16 rule (FlashAttention's): error against the float64 reference at most twice
    the error of the reference itself run in that dtype (plus a tiny floor for exact zeros)."""
    err = (actual.double() - expected64).abs().max().item()
    ref_err = (ref_lowp.double() - expected64).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"error {err:.3g} > 2 x reference error {ref_err:.3g}"


# Unit roundoff of the half types: one rounding of a value computed exactly (or in float32)
# is off by at most this relative amount. For sanity checks of a float32-accumulating
# computation whose only half-precision step is the final cast.
ROUNDING = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
