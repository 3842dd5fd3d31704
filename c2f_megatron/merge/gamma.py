"""Gamma values from the command line (``0.7``, ``0.1:0.9:0.1``, ``0.3,0.7``) and their output names.

Gammas are rounded to two decimals: a sweep ``0.1:0.9:0.1`` accumulates float error (0.30000000000000004)
and the output directories (``gamma_0.70``) are named with two decimals, so two decimals is the resolution.
"""

from __future__ import annotations

import math
from pathlib import Path


class GammaError(ValueError):
    """A gamma specification that cannot be used."""


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise GammaError(f"--gamma {spec!r}: {text!r} is not a number") from exc
    if not math.isfinite(value):
        raise GammaError(f"--gamma {spec!r}: {text!r} is not a finite number")
    return value


def parse_gammas(spec: str) -> list[float]:
    """``'0.7'`` -> [0.7]; ``'0.1:0.9:0.1'`` -> 0.1..0.9 inclusive; ``'0.3,0.7'`` -> [0.3, 0.7].

    Values are rounded to 2 decimals, duplicates dropped (first kept), each must lie in [0, 1].
    """
    spec = spec.strip()
    if not spec:
        raise GammaError("--gamma: empty value")
    values: list[float] = []
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            fields = part.split(":")
            if len(fields) != 3:
                raise GammaError(f"--gamma {spec!r}: a range is START:STOP:STEP, got {part!r}")
            start, stop, step = (_number(f, spec) for f in fields)
            if step <= 0:
                raise GammaError(f"--gamma {spec!r}: step must be > 0, got {step}")
            for bound in (start, stop):
                if not 0.0 <= round(bound, 2) <= 1.0:
                    raise GammaError(f"--gamma {spec!r}: range bound {bound:g} is outside [0, 1]")
            if stop < start:
                raise GammaError(f"--gamma {spec!r}: stop {stop} is below start {start}")
            count = int(math.floor((stop - start) / step + 1e-6)) + 1
            values.extend(start + i * step for i in range(count))
        else:
            values.append(_number(part, spec))
    out: list[float] = []
    for value in values:
        rounded = round(value, 2)
        if not 0.0 <= rounded <= 1.0:
            raise GammaError(f"--gamma {spec!r}: gamma {value:g} is outside [0, 1]")
        if rounded not in out:
            out.append(rounded)
    return out


def gamma_name(gamma: float) -> str:
    """The subdirectory of one sweep value: ``gamma_0.70``."""
    return f"gamma_{gamma:.2f}"


def output_dirs(out: str | Path, gammas: list[float]) -> list[Path]:
    """One gamma: ``out`` itself; several: ``out/gamma_X.XX`` each."""
    out = Path(out)
    if len(gammas) == 1:
        return [out]
    return [out / gamma_name(g) for g in gammas]
