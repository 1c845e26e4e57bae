"""The check lines, the tally the summary counts, and the relative error every check reports."""

from __future__ import annotations

import math

import torch

RESULTS: list[str] = []  # "ok", "FAIL", "skipped" or "measured", one per printed check line


def report(name: str, detail: str, ok: bool | None) -> None:
    """Print one check line: ok / FAIL, or (ok None) a measurement that has no bound."""
    status = "" if ok is None else (" ok" if ok else " FAIL")
    RESULTS.append("measured" if ok is None else ("ok" if ok else "FAIL"))
    print(f"check {name} {detail}{status}", flush=True)


def skip(name: str, reason: str) -> None:
    RESULTS.append("skipped")
    print(f"check {name} skipped: {reason}", flush=True)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (0 when both are all zeros, inf when only want is)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def errors(got: dict, want: dict) -> dict[str, float]:
    """relative_error of each tensor of `want` against the one of the same name in `got`."""
    return {name: relative_error(got[name], want[name]) for name in want}


def fmt(errors: dict[str, float]) -> str:
    return " ".join(f"{name}={e:.1e}" for name, e in errors.items())
