"""The accuracy rule every fused kernel is held to (shared by the tests and ``python -m avmt.bench gpu``).

A fused result is right when its error against a float64 evaluation is at most twice the error of the plain
PyTorch reference run in the same precision, plus a small absolute floor scaled by the result's magnitude
(``floor * (1 + max|truth|)``, so that exact-zero reference errors do not demand bit-exactness). Errors are
max-abs over the whole tensor; NaN anywhere fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def error_report(got: Sequence[Tensor], ref: Sequence[Tensor], truth: Sequence[Tensor], floor: float = 1e-6) -> list[dict[str, Any]]:
    """Per tensor (outputs and gradients, in the same order in all three lists): ``error`` (fused vs truth),
    ``reference_error`` (reference vs truth), ``allowed``, ``ratio`` (error / reference_error) and ``passed``."""
    rows = []
    for g, r, t in zip(got, ref, truth, strict=True):
        t = t.double()
        scale = t.abs().max().item() if t.numel() else 0.0
        err = (g.double() - t).abs().max().item() if t.numel() else 0.0
        err_ref = (r.double() - t).abs().max().item() if t.numel() else 0.0
        allowed = 2 * err_ref + floor * (1 + scale)
        rows.append(
            {
                "error": err,
                "reference_error": err_ref,
                "allowed": allowed,
                "ratio": err / max(err_ref, 1e-300),
                "passed": bool(err <= allowed),
            }
        )
    return rows
