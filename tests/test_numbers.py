"""mechvit._numbers: one rounding rule (half up on the decimal value) for the study's texts and the cards."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechvit._numbers import fmt_fixed, fmt_sig

SMALLEST_NORMAL = 2.2250738585072014e-308


@pytest.mark.parametrize(
    ("x", "digits", "scale", "want"),
    [
        (0.9065, 3, 100, "90.7"),  # 100 * 0.9065 is 90.64999999999999 in floats: Python reads 90.6
        (Fraction(1813, 2000), 3, 100, "90.7"),
        (Fraction(1681, 2000), 3, 100, "84.1"),  # exactly 84.05
        (0.9065 - 0.851, 3, 1, "0.0555"),  # 0.05549999999999999 in floats
        (0.9065 - 0.851, 2, 1, "0.056"),
        (2.5, 1, 1, "3"),  # half up, not Python's half even "2"
        (-2.5, 1, 1, "-3"),
        (0.125, 2, 1, "0.13"),
        (1.2345e-05, 3, 1, "1.23e-05"),
        (12345.6, 3, 1, "1.23e+04"),
        (100.0, 3, 1, "100"),
        (2.0, 3, 1, "2"),
        (2, 3, 1, "2"),
        (0.0, 3, 1, "0"),
        (-0.0, 3, 1, "0"),  # Python: "-0"
        (9.995, 3, 1, "10"),  # the tie carries into one more digit before the point
        (9.9949, 3, 1, "9.99"),
        (0.00012345, 3, 1, "0.000123"),  # -4 <= exponent: still fixed notation
        (0.000012345, 3, 1, "1.23e-05"),
        (999.5, 3, 1, "1e+03"),  # rounds up to 1000, whose exponent 3 >= digits: exponent notation
        (1e100, 3, 1, "1e+100"),
        (-1.5e-7, 1, 1, "-2e-07"),
        (Decimal("0.0555"), 2, 1, "0.056"),
        (Decimal("0.05549999999999999"), 2, 1, "0.055"),  # a Decimal is exact: no noise removed
        (np.float64(0.9065), 3, 100, "90.7"),
        (np.float32(0.9065), 3, 100, "90.7"),
        (np.int64(7), 3, 1, "7"),
        (1.0, 0, 1, "1"),  # .0g is .1g, as in Python
    ],
)
def test_fmt_sig_known_answers(x, digits, scale, want):
    assert fmt_sig(x, digits, scale) == want


@pytest.mark.parametrize(
    ("x", "decimals", "scale", "want"),
    [
        (0.125, 2, 1, "0.13"),  # Python: 0.12 (the float is exactly 0.125, rounded half even)
        (-0.125, 2, 1, "-0.13"),
        (-0.0004, 3, 1, "0.000"),  # never "-0.000"
        (-0.0, 1, 1, "0.0"),
        (0.9065, 1, 100, "90.7"),
        (Fraction(1813, 2000), 1, 100, "90.7"),
        (Fraction(1681, 2000), 1, 100, "84.1"),
        (2.675, 2, 1, "2.68"),  # the float is 2.67499999999999982236431605997495353221893310546875
        (0.5, 0, 1, "1"),
        (1234567.5, 0, 1, "1234568"),
        (0.05, 1, 1, "0.1"),
        (-0.05, 1, 1, "-0.1"),
        (-0.049, 1, 1, "0.0"),
        (7, 3, 1, "7.000"),
        (1.0, 3, 100, "100.000"),
        (3, 2, Fraction(1, 8), "0.38"),  # 0.375, exactly
    ],
)
def test_fmt_fixed_known_answers(x, decimals, scale, want):
    assert fmt_fixed(x, decimals, scale) == want


def test_fmt_fixed_grouping():
    assert fmt_fixed(1234567.5, 0, grouping=True) == "1,234,568"
    assert fmt_fixed(-1234.5, 1, grouping=True) == "-1,234.5"


@pytest.mark.parametrize(
    "fmt", [lambda x: fmt_sig(x, 3), lambda x: fmt_fixed(x, 2), lambda x: fmt_fixed(x, 1, 100)]
)
def test_non_finite_as_python_prints_them(fmt):
    assert fmt(math.nan) == "nan"
    assert fmt(math.inf) == "inf"
    assert fmt(-math.inf) == "-inf"
    assert fmt(Decimal("NaN")) == "nan"


@pytest.mark.parametrize("bad", [True, False, None, "0.5", [0.5], 1j])
def test_not_a_number_is_refused(bad):
    with pytest.raises(TypeError, match="real number"):
        fmt_sig(bad)
    with pytest.raises(TypeError, match="real number"):
        fmt_fixed(bad, 2)


def test_bad_digits_and_scale_are_refused():
    with pytest.raises(ValueError, match="digits"):
        fmt_sig(1.0, -1)
    with pytest.raises(ValueError, match="decimals"):
        fmt_fixed(1.0, 1.5)
    with pytest.raises(ValueError, match="scale"):
        fmt_sig(1.0, 3, math.inf)
    with pytest.raises(TypeError, match="scale"):
        fmt_sig(1.0, 3, True)


def _near_tie(v: Decimal, unit: Decimal) -> bool:
    """Whether ``v`` lies within 1e-9 (relative) of a tie between two multiples of ``unit``."""
    frac = (abs(v) / unit) % 1
    return abs(frac - Decimal("0.5")) * unit <= abs(v) * Decimal("1e-9")


_FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@settings(max_examples=3000, deadline=None)
@given(_FINITE, st.integers(1, 6), st.sampled_from([1, 100]))
def test_fmt_sig_agrees_with_python_away_from_ties(x, digits, scale):
    if x != 0 and abs(x) < SMALLEST_NORMAL:
        return  # a subnormal's repr has fewer digits than its value: the rule rounds the repr
    v = Decimal(scale * x)  # the float Python formats, exactly
    if v != 0 and _near_tie(v, Decimal(10) ** (v.adjusted() - digits + 1)):
        return
    want = format(scale * x, f".{digits}g")
    assert fmt_sig(x, digits, scale) == (want[1:] if want.startswith("-0") and float(want) == 0 else want)


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7), st.integers(0, 6),
       st.sampled_from([1, 100]))  # fmt: skip
def test_fmt_fixed_agrees_with_python_away_from_ties(x, decimals, scale):
    v = Decimal(scale * x)
    if _near_tie(v, Decimal(10) ** -decimals):
        return
    want = format(scale * x, f".{decimals}f")
    if want.startswith("-") and float(want) == 0:
        want = want[1:]  # the one intended difference: never "-0.00"
    assert fmt_fixed(x, decimals, scale) == want


@settings(max_examples=3000, deadline=None)
@given(st.integers(1, 15), st.integers(-(10**15), 10**15), st.integers(-320, 290))
def test_the_nearest_float_formats_back_to_a_short_decimal(digits, mantissa, exponent):
    """The claim behind formatting a rounded value through a float: the float nearest a decimal of at most 15
    significant digits formats back to it with ``.{digits}g`` (no tie crossed), so :func:`fmt_sig`'s own 'g'
    text is Python's for that decimal."""
    d = Decimal(mantissa).scaleb(exponent)
    if d != 0 and len(str(abs(mantissa)).rstrip("0")) > digits:
        d = Decimal(f"{d:.{digits - 1}e}")  # at most `digits` significant digits
    f = float(d)
    if f != 0 and abs(f) < SMALLEST_NORMAL * 10**digits:
        return  # near or below the subnormals a float has fewer digits than that
    assert format(f, f".{digits}g") == fmt_sig(d, digits)
    assert Decimal(fmt_sig(d, digits)) == d


@settings(max_examples=2000, deadline=None)
@given(_FINITE, st.integers(1, 15))
def test_fmt_sig_text_round_trips_through_a_float(x, digits):
    if x != 0 and abs(x) < SMALLEST_NORMAL * 10**digits:
        return
    text = fmt_sig(x, digits)
    assert format(float(text), f".{digits}g") == text


def test_cards_and_study_agree_on_every_count_of_2000():
    """The card's percentage (an exact count) and the study's (the stored float k / 2000) read the same for
    every count, against an independent exact half-up rounding."""
    from mechvit.study.report import _fmt
    from mechvit.study.summary import ci
    from mechvit.training.cards import _pct

    n = 2000
    for k in range(n + 1):
        q = math.floor(Fraction(k, n) * 1000 + Fraction(1, 2))  # tenths of a percent, half up, exactly
        want = f"{q // 10}.{q % 10}"
        assert _pct(Fraction(k, n)) == want, k
        assert _pct(k / n) == want, k
        assert fmt_fixed(k / n, 1, 100) == want, k
        assert _fmt(k / n, pct=True) == want + "%", k
        if k >= n // 10:  # from 10%: three significant digits are one decimal (trailing zeros stripped)
            assert fmt_sig(k / n, 3, 100) == want.rstrip("0").rstrip("."), k
            assert ci({"estimate": k / n}, 100) == want.rstrip("0").rstrip("."), k


def test_exact_inputs_keep_every_digit_whatever_the_decimal_context():
    import decimal

    want = (
        "1000000000000000000000000000001",  # 31 digits: past decimal's default precision of 28
        "0." + "3" * 40,
        "123,456,789,012,345,678,901,234,567,891.00",
        "123456",
        "12345.68",
        "90.7",
    )
    for prec, inexact in ((28, False), (3, True)):  # the default context, and a caller's narrow trapping one
        with decimal.localcontext() as ctx:
            ctx.prec, ctx.traps[decimal.Inexact] = prec, inexact
            got = (
                fmt_fixed(10**30 + 1, 0),
                fmt_fixed(Fraction(1, 3), 40),
                fmt_fixed(123456789012345678901234567891, 2, grouping=True),
                fmt_sig(123456, 6),
                fmt_fixed(12345.678, 2),
                fmt_sig(0.9065, 3, 100),
            )
        assert got == want, (prec, inexact)


def test_huge_and_tiny_exact_numbers():
    # past Python's 4,300-digit limit on int -> str: the exponent comes from bit lengths
    assert fmt_sig(Fraction(10**5000, 3), 3) == "3.33e+4999"
    assert fmt_sig(Fraction(1, 10**5000), 3) == "1e-5000"
    assert fmt_sig(-(10**5000) * 5 // 2, 2) == "-2.5e+5000"
    assert fmt_sig(Fraction(10**400 - 1, 10**400), 3) == "1"  # 0.999... rounds up to a new power of ten


def test_the_noise_tolerance_is_what_the_docstring_says():
    assert fmt_sig(0.12449999999996, 3) == "0.125"  # within the 12-digit tolerance of a tie: the tie
    assert fmt_sig(0.1244999999, 3) == "0.124"  # outside it: the value
    assert fmt_sig(0.12449999999996, 14) == "0.12449999999996"  # 12+ digits: the repr as it is
