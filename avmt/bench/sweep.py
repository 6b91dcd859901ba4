"""Whole-step peak over sequence length, memory option, precision and scheme, and the longest sequence that fits.

``python -m avmt.bench peak-sweep --preset paper --batch 4 --clips 15,30,60,120 --out benchmarks/results/NAME.json``

Each point is one :func:`avmt.bench.peak.step_peak` estimate (fake tensors, scope ``model``). Longer sequences keep
the preset's clip spacing (``data.window_seconds`` grows with T) and raise ``model.max_clips`` to T when needed.
The JSON is rewritten after every point, and points already in ``--out`` are not run again, so a killed sweep
resumes. The longest T per memory budget comes from a least-squares fit of the peak as a quadratic in T (the CNN
activations and the Transformer state grow linearly with T, attention scores quadratically) through the measured
points: a T inside the measured range is interpolated, one beyond it is an extrapolation and marked so, and the
fit through all but the longest measured T says how well it predicted that one (``holdout_rel_error``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from avmt.config import Config, config_from_dict, parse_override
from avmt.workers import context

GIB = 1024**3


VARIANT_NOTES = {
    "plain": "no memory option",
    "cnn_checkpoint": "train.cnn_checkpoint=true train.cnn_chunk=4",
    "clips_with_grad": "train.clips_with_grad=round(0.3 T) (at least 1)",
}


def variants(clips: int) -> dict[str, list[str]]:
    """The memory options compared, as ``train.*`` overrides for sequences of ``clips`` clips."""
    return {
        "plain": [],
        "cnn_checkpoint": ["train.cnn_checkpoint=true", "train.cnn_chunk=4"],  # recompute in chunks of 4 clips
        "clips_with_grad": [f"train.clips_with_grad={max(1, round(0.3 * clips))}"],  # ETAD's 30% of clips
    }


def point_config(base: Config, clips: int, variant: str, precision: str, scheme: str) -> Config:
    """``base`` with T = ``clips`` at its clip spacing, the variant's options, the precision and the scheme."""
    values = base.to_dict()
    spacing = base.data.window_seconds / base.data.num_clips
    values["model"].update(max_clips=max(base.model.max_clips, clips), sharing=scheme)
    values["data"].update(window_seconds=spacing * clips, num_clips=clips)
    values["train"]["precision"] = precision
    for text in variants(clips)[variant]:
        section, key, value = parse_override(text)
        values[section][key] = value
    return config_from_dict(values)


def point_key(clips: int, variant: str, precision: str, scheme: str) -> str:
    return f"T={clips} {variant} {precision} {scheme}"


def fit_quadratic(points: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
    """Least-squares ``peak = a + b·T + c·T²`` through ``(T, peak_bytes)`` points (at least 3 distinct T); a fit
    that bends down (c < 0, which no memory term does) is replaced by the straight line."""
    import numpy as np

    t = np.array([p[0] for p in points], dtype=np.float64)
    if len(set(t.tolist())) < 3:
        raise ValueError(f"a quadratic fit needs 3 distinct T, got {sorted(set(t.tolist()))}")
    y = np.array([p[1] for p in points], dtype=np.float64)
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(t), t, t * t], 1), y, rcond=None)[0]
    if c < 0:
        (a, b), c = np.linalg.lstsq(np.stack([np.ones_like(t), t], 1), y, rcond=None)[0], 0.0
    return float(a), float(b), float(c)


def _peak_at(coeffs: tuple[float, float, float], t: float) -> float:
    a, b, c = coeffs
    return a + b * t + c * t * t


def holdout_error(points: Sequence[tuple[int, int]]) -> float | None:
    """Relative error of the fit through all but the longest T, at the longest T (how far extrapolation can be
    trusted); None with fewer than 4 distinct T."""
    longest = max(t for t, _ in points)
    rest = [p for p in points if p[0] != longest]
    if len({t for t, _ in rest}) < 3:
        return None
    want = next(y for t, y in points if t == longest)
    return abs(_peak_at(fit_quadratic(rest), longest) - want) / want


def largest_clips(points: Sequence[tuple[int, int]], budget_bytes: float, limit: int = 100_000) -> dict[str, Any]:
    """The largest T (up to ``limit``) whose fitted peak is at most ``budget_bytes``, and whether it lies beyond
    the measured T (an extrapolation)."""
    coeffs = fit_quadratic(points)
    budget_bytes *= 1 + 1e-9  # a T whose fit lands on the budget exactly fits, despite lstsq's rounding
    if _peak_at(coeffs, 1) > budget_bytes:
        return {"largest_clips": 0, "extrapolated": False}
    if _peak_at(coeffs, limit) <= budget_bytes:
        return {"largest_clips_at_least": limit, "extrapolated": True}
    lo, hi = 1, limit  # peak(lo) fits, peak(hi) does not; the fit grows with T (c >= 0, b > 0 in practice)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _peak_at(coeffs, mid) <= budget_bytes else (lo, mid)
    return {"largest_clips": lo, "extrapolated": lo > max(t for t, _ in points)}


def fits_table(results: dict[str, dict[str, Any]], budgets_gib: Iterable[float]) -> dict[str, dict[str, Any]]:
    """For each (variant, precision, scheme) with 3+ measured T: the largest T per budget (GiB)."""
    series: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for r in results.values():
        if "peak_bytes" in r:
            series.setdefault((r["variant"], r["precision"], r["scheme"]), []).append((r["clips"], r["peak_bytes"]))
    out: dict[str, dict[str, Any]] = {}
    for (variant, precision, scheme), pts in sorted(series.items()):
        if len({t for t, _ in pts}) < 3:
            continue
        out[f"{variant} {precision} {scheme}"] = {
            "variant": variant,
            "precision": precision,
            "scheme": scheme,
            "measured_clips": sorted(t for t, _ in pts),
            "fit_bytes": dict(zip(("a", "b_per_clip", "c_per_clip2"), fit_quadratic(pts), strict=True)),
            "holdout_rel_error": holdout_error(pts),
            "budgets": {f"{g:g}": largest_clips(pts, g * GIB) for g in budgets_gib},
        }
    return out


def run_point(cfg: Config, batch: int) -> dict[str, Any]:
    """One point, in a worker process: the estimate and the seconds it took."""
    import time

    import torch

    from avmt.bench.peak import step_peak

    torch.set_num_threads(1)  # fake tensors compute nothing; one thread per worker keeps the workers apart
    t0 = time.perf_counter()
    r = step_peak(cfg, batch, mode="fake")
    return {**r.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}


def run_sweep(
    base: Config,
    batch: int,
    clips: Sequence[int],
    variant_names: Sequence[str],
    precisions: Sequence[str],
    schemes: Sequence[str],
    doc: dict[str, Any],
    save: Any,
    jobs: int = 1,
) -> dict[str, Any]:
    """Runs every point not yet in ``doc["results"]`` (``jobs`` processes), calling ``save(doc)`` after each."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    results = doc.setdefault("results", {})
    todo = {}
    for t in clips:
        for v in variant_names:
            for p in precisions:
                for s in schemes:
                    key = point_key(t, v, p, s)
                    if "peak_bytes" not in results.get(key, {}):
                        todo[key] = (point_config(base, t, v, p, s), {"clips": t, "variant": v, "precision": p, "scheme": s})
    # the slowest points (long T, recompute in small chunks) first, so that the pool ends evenly
    order = sorted(todo, key=lambda k: (-todo[k][1]["clips"], todo[k][1]["variant"] != "cnn_checkpoint"))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context()) as pool:
        futures = {pool.submit(run_point, todo[k][0], batch): k for k in order}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="peak sweep", unit="point"):
            key = futures[fut]
            cfg, meta = todo[key]
            try:
                results[key] = {**meta, "overrides": variants(meta["clips"])[meta["variant"]], **fut.result()}
            except Exception as e:  # recorded, not fatal: the other points still run
                results[key] = {**meta, "error": f"{type(e).__name__}: {e}"}
            save(doc)
    return doc
