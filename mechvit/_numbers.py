"""Numbers as text, with one rounding rule for the study's human-facing texts (the report's tables, claims and
key numbers, the README/docs blocks of ``mechvit.study.summary``, ``mechvit compare``) and the checkpoint cards'
docs tables and ``mechvit evaluate``'s summary: round half up (away from zero at an exact tie) on the number's
decimal value. Python's float formatting rounds the binary float instead, so a tie can read one lower: 1813 of
2,000 is stored as the float 0.9065, whose x 100 is 90.64999999999999, and ``f"{100 * 0.9065:.3g}"`` reads 90.6
while the card's exact count reads 90.7. Here 1813 of 2,000 reads 90.7 in both.

A float's decimal value is its shortest repr (``0.9065``), first rounded to :data:`NOISE_DIGITS` significant
digits (half even) to remove the noise of float arithmetic (``0.9065 - 0.851`` is 0.05549999999999999 and
counts as 0.0555); scaling (x 100 for a percentage) is exact, on that value; ints, Fractions and Decimals are
exact as they are. The cleaning is a tolerance: a float within half a unit of its 12th significant digit of a
tie counts as the tie (``0.12449999999996`` reads 0.125 at 3 digits, its exact value 0.124), a difference below
what float arithmetic on the study's numbers can resolve; asked for 12 or more digits, a float is used as its
repr is. A value that rounds to zero prints unsigned (never ``-0.000``); NaN and the infinities print as Python
prints them (``nan``, ``inf``, ``-inf``). The text is built from integers, so the caller's ``decimal`` context
(precision, traps) plays no part."""

from __future__ import annotations

import math
import numbers
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction

NOISE_DIGITS = 12  # a float's repr is rounded to this many significant digits before the final rounding
_NOISE = Context(prec=NOISE_DIGITS, rounding=ROUND_HALF_EVEN)


def _parse(x: object, what: str) -> tuple[Decimal | Fraction, bool] | float:
    """``(exact value, whether it came from a float)``, or the float itself when it is NaN or infinite."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, Decimal)):
        raise TypeError(
            f"{what} must be a real number (int, float, Fraction or Decimal), got {type(x).__name__} {x!r}"
        )
    if isinstance(x, Decimal):
        return (x, False) if x.is_finite() else float(x)
    if isinstance(x, numbers.Integral):
        return Fraction(int(x)), False
    if isinstance(x, numbers.Rational):
        return Fraction(x.numerator, x.denominator), False
    f = float(x)
    if not math.isfinite(f):
        return f
    # a float's shortest repr (float.__repr__: numpy's float64 subclass reprs as np.float64(...)); another real
    # type (numpy's float32) by its own str when that is a number, which is its shortest repr at its precision
    text = float.__repr__(f) if isinstance(x, float) else str(x)
    try:
        return Decimal(text), True
    except ArithmeticError:
        return Decimal(float.__repr__(f)), True


def _value(
    x: object, scale: object, digits: int | None = None, decimals: int | None = None
) -> Fraction | float:
    """``scale * x`` exactly, as a Fraction (a float's decimal value cleaned of noise: module docstring), or a
    non-finite float. A float is cleaned only when the final rounding (to ``digits`` significant digits or to
    ``decimals`` decimals) keeps fewer than :data:`NOISE_DIGITS` significant digits: asking for more uses its
    repr as it is."""
    v, s = _parse(x, "the number"), _parse(scale, "scale")
    if isinstance(s, float):
        raise ValueError(f"scale must be finite, got {scale!r}")
    factor = Fraction(s[0])
    if isinstance(v, float):
        return v * float(factor)  # NaN and the infinities as Python has them
    value, noisy = v
    if noisy and value != 0 and factor != 0:
        kept = digits if digits is not None else _exponent(Fraction(value) * factor) + 1 + (decimals or 0)
        if kept < NOISE_DIGITS:
            value = _NOISE.plus(value)
    return Fraction(value) * factor


def _half_up(v: Fraction) -> int:
    """``|v|`` rounded half up to an integer."""
    return math.floor(abs(v) + Fraction(1, 2))


def _exponent(v: Fraction) -> int:
    """``floor(log10(|v|))`` of a nonzero ``v``, exactly."""
    a = abs(v)
    # from the bit lengths (within 1 of the answer; str() of a huge int would hit Python's 4,300-digit limit)
    e = math.floor((a.numerator.bit_length() - a.denominator.bit_length()) * math.log10(2))
    while Fraction(10) ** e > a:
        e -= 1
    while Fraction(10) ** (e + 1) <= a:
        e += 1
    return e


def _fixed_text(q: int, decimals: int, grouping: bool = False) -> str:
    """``q x 10**-decimals`` (``q >= 0``) with exactly ``decimals`` decimals, built from the integer's digits: no
    decimal context (whose precision and traps are the caller's) takes part."""
    s = str(q).rjust(decimals + 1, "0")
    whole, frac = (s[:-decimals], s[-decimals:]) if decimals else (s, "")
    if grouping:
        whole = f"{int(whole):,}"
    return whole + ("." + frac if decimals else "")


def _check_count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {n!r}")
    return int(n)


def fmt_sig(x: object, digits: int = 3, scale: object = 1) -> str:
    """``format(scale * x, f".{digits}g")`` rounded half up on the decimal value (module docstring): the same
    switch to exponent notation (``1.23e-05``, ``1.23e+04``) and the same stripping of trailing zeros as
    Python's float ``g``, but ``fmt_sig(0.9065, 3, 100) == "90.7"`` (Python: 90.6), ``fmt_sig(2.5, 1) == "3"``
    (Python: 2) and never ``-0``."""
    p = max(1, _check_count(digits, "digits"))  # Python's .0g is .1g
    v = _value(x, scale, digits=p)
    if isinstance(v, float):
        return format(v, f".{p}g")
    if v == 0:
        return "0"
    e = _exponent(v)
    q = _half_up(v / Fraction(10) ** (e - p + 1))
    if q == 10**p:  # 9.995 -> 10.0: one more digit before the point
        q, e = q // 10, e + 1
    sign = "-" if v < 0 else ""
    if -4 <= e < p:  # fixed notation, p significant digits, trailing zeros stripped
        text = _fixed_text(q, p - 1 - e)  # e < p: q x 10**(e - p + 1) has p - 1 - e >= 0 decimals
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return sign + text
    s = str(q)
    mantissa = (s[0] + "." + s[1:]).rstrip("0").rstrip(".")
    return f"{sign}{mantissa}e{e:+03d}"


def fmt_fixed(x: object, decimals: int, scale: object = 1, grouping: bool = False) -> str:
    """``format(scale * x, f".{decimals}f")`` (``f",.{decimals}f"`` with ``grouping``) rounded half up on the
    decimal value (module docstring): ``fmt_fixed(0.125, 2) == "0.13"`` (Python: 0.12), and a value that
    rounds to zero prints unsigned (``fmt_fixed(-0.0004, 3) == "0.000"``)."""
    d = _check_count(decimals, "decimals")
    v = _value(x, scale, decimals=d)
    if isinstance(v, float):
        return format(v, f"{',' if grouping else ''}.{d}f")
    q = _half_up(v * 10**d)
    text = _fixed_text(q, d, grouping)
    return ("-" if v < 0 and q else "") + text
