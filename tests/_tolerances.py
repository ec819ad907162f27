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


def assert_low_precision_close(actual, expected64, ref_lowp, magnitude=None, ulps=1.0):
    """fp16/bf16 rule, element-wise (docs/numerics.md): at every element the error against the
    float64 result is at most twice the low-precision reference's error there, plus ``ulps``
    ulps of the dtype (``2 ulps ROUNDING`` relative) of the element's ``magnitude``, plus 1e-6
    (a floor for float32 noise at exact zeros). ``magnitude`` defaults to ``|expected64|``
    (a result computed in float32 and rounded once); for a sum of products pass the same sum
    of the operands' absolute values, which bounds the rounding of each product's operands
    (FlashAttention's P and dS cast to half on a GPU)."""
    a, e, r = (x.detach().double().cpu() for x in (actual, expected64, ref_lowp))
    m = e.abs() if magnitude is None else magnitude.detach().double().cpu()
    bound = 2 * (r - e).abs() + 2 * ulps * ROUNDING[actual.dtype] * m + 1e-6
    err = (a - e).abs()
    bad = ~(err <= bound) & ~(a.isnan() & e.isnan())  # any other NaN fails
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(bad.sum())} of {a.numel()} elements beyond the low-precision bound, first at "
            f"{list(i)}: {a[i].item()!r} vs {e[i].item()!r} (error {err[i].item():.3g} > "
            f"{bound[i].item():.3g}; reference error {(r - e).abs()[i].item():.3g})"
        )


# Unit roundoff of the half types: one rounding of a value computed exactly (or in float32)
# is off by at most this relative amount. For sanity checks of a float32-accumulating
# computation whose only half-precision step is the final cast.
ROUNDING = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
