"""The largest batch whose training step fits on a device.

:func:`largest_fitting_batch` is the search, pure and testable with any predicate; :func:`training_step_fits`
is the CUDA predicate: one real training step (``Pretraining`` forward + backward + AdamW step) of a fresh
model, ``torch.cuda.OutOfMemoryError`` caught and the memory released, so a failed try never crashes the caller.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from avmt.config import Config


def largest_fitting_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> tuple[int, list[tuple[int, bool]]]:
    """Largest ``b`` in ``[1, limit]`` with ``fits(b)``, assuming ``fits`` is monotone (true up to some b, false after).

    Doubles from ``start`` until a batch fails or ``limit`` is reached, then bisects between the last batch that
    fit and the first that did not. Returns ``(best, trials)``: ``best`` is 0 when even batch 1 does not fit;
    ``trials`` lists every ``(batch, fitted)`` in the order tried (each batch is tried at most once).
    """
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    trials: list[tuple[int, bool]] = []
    cache: dict[int, bool] = {}

    def attempt(b: int) -> bool:
        if b not in cache:
            cache[b] = bool(fits(b))
            trials.append((b, cache[b]))
        return cache[b]

    good, bad = 0, None
    b = start
    while True:
        if attempt(b):
            good = b
            if b == limit:
                return good, trials
            b = min(2 * b, limit)
        else:
            bad = b
            break
    if good == 0 and bad is not None and bad > 1:  # start itself failed: search below it
        lo, hi = 0, bad
    else:
        lo, hi = good, bad
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def training_step_fits(cfg: Config, batch: int, device: str | torch.device = "cuda") -> bool:
    """True if one training step of ``batch`` sequences runs on ``device`` (CUDA) without running out of memory.

    The step is the one ``avmt.train`` runs: ``Pretraining`` forward under bf16 autocast when ``avmt.train`` would
    use it (:func:`avmt.optim.use_bf16`), backward, then ``AdamW.step()`` (which allocates the optimizer state). Everything is
    freed before returning, OOM or not.
    """
    from avmt.bench import training_step

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("training_step_fits measures a CUDA device's memory; got " + str(device))

    def step() -> None:  # every tensor it makes is a local, freed when it returns or raises
        float(training_step(cfg, batch, device).step())

    fitted = True
    try:
        step()
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or an allocation failure reported by cuDNN/cuBLAS
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        fitted = False  # the exception (and the frames holding the step's tensors) is dropped at the end of this block
    gc.collect()
    torch.cuda.empty_cache()
    return fitted
