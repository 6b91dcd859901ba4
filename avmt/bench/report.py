"""Turn benchmark result JSON into a Markdown report and PNG plots: ``python -m avmt.bench report``.

Reads every ``*.json`` given (files or folders, default ``benchmarks/results``):

- pytest-benchmark JSON (``--benchmark-json``): each benchmark's ``extra_info`` says what it measured —
  ``kind="memory"`` (:mod:`avmt.bench.memory` records), ``kind="step"`` (training-step time),
  ``kind="largest_batch"``, the low-rank kernel sweep (``impl`` = triton / reference / compiled) and the
  negative-sampling sweep (``backend``), ``kind="loader_side_by_side"`` (the loader fed three ways, timed in
  alternating rounds; read as one ``kind="loader"`` record per case, as older files hold them); the file's ``avmt`` block
  (device, versions, command, date) is quoted;
- the summary JSON of the removed ``benchmarks/bench_loader.py`` (``"bench": "cpu_loader"``) and of the sampling sweep
  (``"benchmark": "sample_negatives..."``).

Where the same case was measured more than once, full-mode runs win over quick ones, then the newest.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avmt.config import SHARING_SCHEMES

MiB = 2**20
COMPONENTS = ("weights", "grads", "optimizer", "weight_copies", "activations")
COMPONENT_LABELS = {
    "weights": "weights",
    "grads": "gradients",
    "optimizer": "AdamW state (3 buffers)",
    "weight_copies": "bf16 weight copies (autocast)",
    "activations": "activations",
}


@dataclass
class Record:
    """One measured case: where it came from and what it says."""

    source: str
    meta: dict[str, Any]
    name: str
    info: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        return self.meta.get("mode") == "full"

    @property
    def date(self) -> str:
        return str(self.meta.get("date") or self.meta.get("datetime") or "")


@dataclass
class Results:
    records: list[Record] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)  # one per file: path, kind, device, date, command
    loader: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)  # the sampling sweep's summary files
    gpu_checks: list[dict[str, Any]] = field(default_factory=list)  # python -m avmt.bench gpu
    peaks: list[dict[str, Any]] = field(default_factory=list)  # python -m avmt.bench peak, collected
    sweeps: list[dict[str, Any]] = field(default_factory=list)  # python -m avmt.bench peak-sweep
    skipped: list[str] = field(default_factory=list)


def _cpu_source(f: Path, kind: str, data: dict[str, Any], command: str | None) -> dict[str, Any]:
    """The source line of a result file that records its own device, torch and date at the top level."""
    return {
        "path": str(f),
        "kind": kind,
        "device": data.get("device"),
        "torch": data.get("torch"),
        "date": data.get("date"),
        "command": command,
        "mode": "full",
    }


def load_results(paths: Iterable[str | Path], check: bool = False) -> Results:
    """Read result files (JSON files or folders of them) into :class:`Results`. A file that is not JSON, not a
    regular file (a FIFO would block the read) or of no kind this report knows is skipped, with why (``skipped``).
    ``check``: also skip a file of a known kind whose content the report cannot render (junk under a known
    marker), by rendering it alone first, so that one bad file cannot end the report in a traceback."""
    res = Results()
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    for f in files:
        one = Results()  # each file on its own, so that a bad one leaves nothing half-read behind
        try:
            _load_file(one, f)
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a known marker over junk fields
            one = Results(skipped=[f"{f}: not a valid result file ({type(e).__name__}: {e})"])
        if check and one.sources:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    render(one, tmp, plots=False)
            except Exception as e:  # any malformed field: the file is named and skipped, not trusted
                one = Results(skipped=[f"{f}: not a valid {one.sources[0]['kind']} result ({type(e).__name__}: {e})"])
        for name in ("records", "sources", "loader", "sampling", "gpu_checks", "peaks", "sweeps", "skipped"):
            getattr(res, name).extend(getattr(one, name))
    return res


def _load_file(res: Results, f: Path) -> None:
    """Add result file ``f`` to ``res`` (or to ``res.skipped``, with why)."""
    if not f.is_file():
        res.skipped.append(f"{f}: not a regular file")
        return
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        res.skipped.append(f"{f}: not JSON ({type(e).__name__}: {e})")
        return
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        meta = dict(data.get("avmt") or {})
        meta.setdefault("date", data.get("datetime"))
        meta.setdefault("device", (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw"))
        res.sources.append({"path": str(f), "kind": "pytest-benchmark", **meta})
        for b in data["benchmarks"]:
            info, name, stats = dict(b.get("extra_info") or {}), b.get("name", ""), dict(b.get("stats") or {})
            if info.get("kind") == "loader_side_by_side":  # one record per case, with what the cases share
                shared = {k: v for k, v in info.items() if k not in ("kind", "cases")}
                for case in info.get("cases", []):
                    res.records.append(Record(str(f), meta, f"{name}[{case['case']}]", {**shared, **case, "kind": "loader"}, stats))
                return
            res.records.append(Record(str(f), meta, name, info, stats))
    elif isinstance(data, dict) and data.get("bench") == "cpu_loader":
        res.loader.append({"path": str(f), **data})
        res.sources.append(
            {
                "path": str(f),
                "kind": "bench_loader.py",
                "device": f"cpu ({data.get('cpus')} cores)",
                "torch": data.get("torch"),
                "date": data.get("date"),
                "command": data.get("command"),
                "mode": "quick" if data.get("quick") else "full",
            }
        )
    elif isinstance(data, dict) and data.get("bench") == "whole-step peak":
        res.peaks.append({"path": str(f), **data})
        res.sources.append(_cpu_source(f, "python -m avmt.bench peak", data, "; ".join(r["command"] for r in data["runs"].values())))
    elif isinstance(data, dict) and data.get("bench") == "peak sweep":
        res.sweeps.append({"path": str(f), **data})
        res.sources.append(_cpu_source(f, "python -m avmt.bench peak-sweep", data, data.get("command")))
    elif isinstance(data, dict) and data.get("kind") == "avmt-gpu-check":
        res.gpu_checks.append({"path": str(f), **data})
        res.sources.append(
            {
                "path": str(f),
                "kind": "python -m avmt.bench gpu",
                "device": (data.get("device") or {}).get("name"),
                "torch": (data.get("versions") or {}).get("torch"),
                "date": data.get("date"),
                "command": data.get("command"),
                "mode": "dry run" if data.get("dry_run") else "full",
            }
        )
    elif isinstance(data, dict) and str(data.get("benchmark", "")).startswith("sample_negatives"):
        res.sampling.append({"path": str(f), **data})
        res.sources.append(
            {
                "path": str(f),
                "kind": "sampling sweep",
                "device": data.get("device"),
                "torch": data.get("torch"),
                "date": data.get("date"),
                "command": data.get("command"),
                "mode": "full",
            }
        )
    else:
        res.skipped.append(f"{f}: not a result file this report knows")


def _latest(records: list[Record], key) -> dict[Any, Record]:
    """One record per key: full mode over quick, then the newest."""
    out: dict[Any, Record] = {}
    for r in records:
        k = key(r)
        cur = out.get(k)
        if cur is None or (r.full, r.date) >= (cur.full, cur.date):
            out[k] = r
    return out


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal and thousands separators; ``-`` for a missing value."""
    return "-" if n is None else f"{n / MiB:,.1f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _scheme_order(s: str) -> int:
    return SHARING_SCHEMES.index(s) if s in SHARING_SCHEMES else len(SHARING_SCHEMES)


# -- memory ----------------------------------------------------------------------------------------------------------
def memory_records(res: Results) -> dict[tuple, Record]:
    mem = [r for r in res.records if r.info.get("kind") == "memory"]
    return _latest(
        mem,
        lambda r: (
            r.info["scope"],
            r.info["mode"],
            r.info["precision"],
            r.info["preset"],
            r.info["variant"],
            r.info["sharing"],
            r.info["batch"],
            r.info["clips"],
            r.info["device"],
        ),
    )


def _mem_component(info: dict[str, Any], comp: str, parts: tuple[str, ...] | None = None) -> int:
    if comp == "activations":
        return int(sum(info["activations"].values()))
    if comp == "weight_copies":
        return int(info.get("weight_copies", 0))
    d = info[comp]
    return int(sum(v for k, v in d.items() if parts is None or k in parts))


def transformer_ratio(mem: dict[tuple, Any]) -> dict[str, Any] | None:
    """The headline from :func:`memory_records`: weights + gradients + AdamW state of the Transformer part, none / lowrank,
    paper preset."""
    pick = {}
    for k, r in mem.items():
        scope, mode, precision, preset, variant, sharing = k[:6]
        if scope == "transformer" and precision == "fp32" and preset == "paper" and variant == "paper":
            pick.setdefault(sharing, r)
    if "none" not in pick or "lowrank" not in pick:
        return None
    state = {s: r.info["transformer_train_state"] for s, r in pick.items()}
    return {
        "none_bytes": state["none"],
        "lowrank_bytes": state["lowrank"],
        "ratio": state["none"] / state["lowrank"],
        "param_ratio": pick["none"].info["params"]["transformer"] / pick["lowrank"].info["params"]["transformer"],
        "state": state,
    }


def _memory_section(res: Results, out_dir: Path, plots: bool) -> list[str]:
    mem = memory_records(res)
    md: list[str] = ["## Memory per sharing scheme", ""]
    if not mem:
        return md + ["No memory results.", ""]
    md += [
        "Bytes of one training step (`avmt.bench.memory.measure_step`): weights, gradients and AdamW+AMSGrad state "
        "(3 buffers) from the tensors after a real `optimizer.step()`; activations = what autograd saves for backward "
        "(`saved_tensors_hooks`, each storage once, parameters and the input batch excluded; saved casts of parameters, i.e. "
        "the bf16 weight copies autocast keeps, are a column of their own). `fake` = FakeTensorMode "
        "(shapes only, no compute; checked equal to real runs), `real` = computed on the device named. *total* = "
        "weights + gradients + optimizer + weight copies + activations + inputs: an estimate of the peak without temporaries.",
        "",
    ]
    ratio = transformer_ratio(mem)
    if ratio:
        md += [
            f"**Transformer part, paper preset: weights + gradients + AdamW state {mib(ratio['none_bytes'])} MiB (`none`) vs "
            f"{mib(ratio['lowrank_bytes'])} MiB (`lowrank`): {ratio['ratio']:.1f}× smaller** "
            f"(parameter ratio {ratio['param_ratio']:.1f}×).",
            "",
        ]

    def shapes(scope: str, preset: str, variant: str, precision: str) -> list[tuple[int, int]]:
        """The (batch, clips) measured for this case, largest batch first."""
        return sorted(
            {(k[6], k[7]) for k in mem if k[0] == scope and k[3] == preset and k[4] == variant and k[2] == precision}, reverse=True
        )

    def group(scope: str, preset: str, variant: str, precision: str, shape: tuple[int, int]) -> dict[str, Record]:
        rows = {}
        for k, r in sorted(mem.items(), key=lambda kv: kv[0][1] != "real"):  # real over fake (equal where both ran: tested)
            if k[0] == scope and k[3] == preset and k[4] == variant and k[2] == precision and (k[6], k[7]) == shape:
                rows.setdefault(k[5], r)
        return dict(sorted(rows.items(), key=lambda kv: _scheme_order(kv[0])))

    def describe(r: Record) -> str:
        i = r.info
        return (
            f"D={i['dim']}, L={i['layers']}, heads={i['heads']}, FFN={i['ffn_dim']}, O={i['rank']}, "
            f"batch {i['batch']} × T={i['clips']} clips, "
            f"{i['precision']}, {i['mode']} on {i['device']} ({Path(r.source).name})"
        )

    # 1. Transformer part / whole model at the paper preset, per precision
    for scope, title, parts in (
        ("transformer", "Transformer part (`model.encode`)", ("transformer", "embedding")),
        ("model", "Whole model with CNNs (CNNs + projections + Transformers)", None),
        ("pretraining", "Real pretraining step (MEP + CPP heads included)", None),
    ):
        for preset in sorted({k[3] for k in mem if k[0] == scope}, key=lambda p: (p != "paper", p)):
            for precision, shape in ((p, sh) for p in ("fp32", "bf16") for sh in shapes(scope, preset, preset, p)):
                rows = group(scope, preset, preset, precision, shape)
                first = next(iter(rows.values()))
                modes = sorted({r.info["mode"] for r in rows.values()})
                md += [
                    f"### {title}: `{preset}` preset, batch {shape[0]} × T={shape[1]}, {precision}",
                    "",
                    describe(first).replace(f", {first.info['mode']} on", f", {' + '.join(modes)} on"),
                    "",
                ]
                copies = any(r.info.get("weight_copies") for r in rows.values())
                head = [
                    "scheme",
                    "Transformer params",
                    "weights MiB",
                    "gradients MiB",
                    "AdamW MiB",
                    "Transformer w+g+opt MiB",
                    "vs none",
                    "activations MiB",
                    "(CNN / Transformer / heads)",
                    *(["bf16 weight copies MiB"] if copies else []),
                    "total MiB",
                ]
                bstate = rows["none"].info["transformer_train_state"] if "none" in rows else None
                table = []
                for s, r in rows.items():
                    i = r.info
                    tstate = i["transformer_train_state"]
                    split = " / ".join(mib(i["activations"].get(p, 0)) for p in ("cnn", "transformer", "heads") if p in i["activations"])
                    peak = f" (GPU peak {mib(i['peak_allocated'])})" if i.get("peak_allocated") else ""
                    table.append(
                        [
                            f"`{s}`",
                            f"{i['params']['transformer']:,}",
                            mib(_mem_component(i, "weights", parts)),
                            mib(_mem_component(i, "grads", parts)),
                            mib(_mem_component(i, "optimizer", parts)),
                            mib(tstate),
                            f"{bstate / tstate:.1f}× smaller" if bstate and s != "none" else "-",
                            mib(_mem_component(i, "activations")),
                            split,
                            *([mib(i.get("weight_copies", 0))] if copies else []),
                            mib(i["estimated_peak"]) + peak,
                        ]
                    )
                md += [_table(head, table), ""]
                if plots:
                    name = f"memory_{scope}_{preset}_b{shape[0]}_t{shape[1]}_{precision}.png"
                    _plot_stacked(
                        rows,
                        parts,
                        out_dir / name,
                        f"{title}\n{preset} preset, batch {first.info['batch']}, T={first.info['clips']}, {precision}",
                    )
                    md += [f"![{title}, {preset}]({name})", ""]

    # 2. sweeps around the paper preset
    for scope, title in (("transformer", "Transformer part"), ("model", "Whole model with CNNs")):
        variants = sorted({k[4] for k in mem if k[0] == scope and k[3] == "paper" and k[2] == "fp32"})
        if len(variants) < 2:
            continue
        md += [
            f"### Sweep around the paper preset: {title}, fp32, batch {BATCH_NOTE}",
            "",
            "Per cell: weights + gradients + AdamW state of the Transformer layers / activations / total, MiB.",
            "",
        ]
        cols = [s for s in SHARING_SCHEMES if any(k[5] == s for k in mem if k[0] == scope)]
        table, sweep = [], {}
        for v in sorted(variants, key=_variant_order):
            rows = group(
                scope, "paper", v, "fp32", next((sh for sh in shapes(scope, "paper", v, "fp32") if sh[0] == SWEEP_BATCH), (-1, -1))
            )
            if not rows:
                continue
            first = next(iter(rows.values())).info
            cells = []
            for s in cols:
                r = rows.get(s)
                if r is None:
                    cells.append("-")
                    continue
                tstate = r.info["transformer_train_state"]
                cells.append(f"{mib(tstate)} / {mib(_mem_component(r.info, 'activations'))} / {mib(r.info['estimated_peak'])}")
                sweep[(v, s)] = (first, tstate, _mem_component(r.info, "activations"), r.info["estimated_peak"])
            table.append([v, f"D={first['dim']} L={first['layers']} T={first['clips']}", *cells])
        md += [_table(["variant", "shape", *[f"`{s}`" for s in cols]], table), ""]
        if plots:
            name = f"memory_sweep_{scope}.png"
            _plot_sweep(
                sweep,
                cols,
                out_dir / name,
                f"{title}: memory vs D, L, T (paper preset otherwise), fp32, batch {SWEEP_BATCH}; activations of none/layers/all coincide",
            )
            md += [f"![{title} sweep]({name})", ""]
    return md


SWEEP_BATCH = 4
BATCH_NOTE = f"{SWEEP_BATCH} (the paper's per-GPU batch)"


def _variant_order(v: str) -> tuple[int, int]:
    if v == "paper":
        return (0, 0)
    axis = {"D": 1, "L": 2, "T": 3}.get(v[:1], 4)
    try:
        return (axis, int(v[1:]))
    except ValueError:
        return (axis, 0)


def _plot_stacked(rows: dict[str, Record], parts: tuple[str, ...] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bottom = [0.0] * len(schemes)
    colors = {"weights": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "weight_copies": "#dd8452", "activations": "#8172b2"}
    for comp in COMPONENTS:
        vals = [_mem_component(rows[s].info, comp, parts) / MiB for s in schemes]
        if not any(vals):
            continue
        ax.bar(schemes, vals, bottom=bottom, label=COMPONENT_LABELS[comp], color=colors[comp])
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, b in enumerate(bottom):
        ax.text(x, b, f"{b:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(sweep: dict[tuple[str, str], tuple], schemes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_def = (("D", "dim", "D (width)"), ("L", "layers", "L (layers per Transformer)"), ("T", "clips", "T (clips per sequence)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (prefix, key, label) in zip(axes, axes_def):
        for s in schemes:
            pts = sorted(
                {
                    (info[key], state, act)
                    for (v, sc), (info, state, act, _) in sweep.items()
                    if sc == s and (v == "paper" or v.startswith(prefix))
                }
            )
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] / MiB for p in pts], marker="o", label=f"{s}: w+g+opt")[0]
            ax.plot(
                [p[0] for p in pts],
                [p[2] / MiB for p in pts],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{s}: activations",
            )
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MiB (log)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- speed -----------------------------------------------------------------------------------------------------------
def _speed_section(res: Results, out_dir: Path, plots: bool) -> list[str]:
    every = _latest(
        [r for r in res.records if r.info.get("kind") == "step"],
        lambda r: (
            r.info["preset"],
            r.info["sharing"],
            r.info["batch"],
            r.info["device"],
            r.info["precision"],
            r.info.get("variant", "plain"),
        ),
    )
    steps = {k[:5]: r for k, r in every.items() if k[5] == "plain"}  # per scheme, the plain step
    variants = {k: r for k, r in every.items() if k[5] != "plain"}  # the CNN memory options, beside their plain step
    md = ["## Training-step time per sharing scheme", ""]
    if not steps:
        return md + ["No step timings.", ""]
    md += ["One `Pretraining` step (forward with MEP + CPP, backward, AdamW step) on random clips, no data loading.", ""]
    rows = []
    for _key, r in sorted(steps.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2], _scheme_order(kv[0][1]))):
        i, st = r.info, r.stats
        rows.append(
            [
                f"`{i['preset']}`",
                f"`{i['sharing']}`",
                str(i["batch"]),
                f"{i['device']} ({i['precision']})",
                f"{st.get('mean', float('nan')):.3f}",
                f"{st.get('min', float('nan')):.3f}",
                f"{st.get('median', float('nan')):.3f}",
                f"{i['sequences_per_s']:.2f}" if i.get("sequences_per_s") else "-",
                str(st.get("rounds", "-")),
                f"{r.meta.get('mode', '?')}, {Path(r.source).name}",
            ]
        )
    md += [_table(["preset", "scheme", "batch", "device", "mean s", "min s", "median s", "sequences/s", "rounds", "run"], rows), ""]
    md += [_load_note(list(steps.values())), ""]
    if variants:
        md += [
            "CNN memory options (`train.cnn_checkpoint`, `train.cnn_chunk`, `train.clips_with_grad`), median s per step and the",
            "ratio to the plain step of the same run:",
            "",
        ]
        vrows = []
        for k, r in sorted(variants.items()):
            base = steps.get(k[:5])
            ratio = r.stats.get("median", float("nan")) / base.stats["median"] if base is not None and base.stats.get("median") else None
            vrows.append(
                [f"`{k[0]}`", f"`{k[1]}`", k[5], str(k[2]), f"{r.stats.get('median', float('nan')):.3f}", f"{ratio:.2f}×" if ratio else "-"]
            )
        md += [_table(["preset", "scheme", "variant", "batch", "median s", "vs plain"], vrows), ""]
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({(k[0], k[2], k[3], k[4]) for k in steps})
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
        for ax, (preset, batch, device, precision) in zip(axes[0], groups):
            sel = sorted(
                ((k[1], r) for k, r in steps.items() if (k[0], k[2], k[3], k[4]) == (preset, batch, device, precision)),
                key=lambda x: _scheme_order(x[0]),
            )
            ax.bar([s for s, _ in sel], [r.stats.get("median", 0) for _, r in sel], color="#4c72b0")
            ax.errorbar(
                [s for s, _ in sel],
                [r.stats.get("median", 0) for _, r in sel],
                yerr=[
                    [r.stats.get("median", 0) - r.stats.get("min", 0) for _, r in sel],
                    [r.stats.get("max", 0) - r.stats.get("median", 0) for _, r in sel],
                ],
                fmt="none",
                color="k",
                capsize=3,
            )
            ax.set_title(f"{preset}, batch {batch}, {device} {precision}", fontsize=9)
            ax.set_ylabel("s per step (median, min-max)")
        fig.tight_layout()
        fig.savefig(out_dir / "speed_step.png", dpi=110)
        plt.close(fig)
        md += ["![training-step time](speed_step.png)", ""]
    return md


def _load_note(records: list[Record]) -> str:
    loads = sorted({r.info["loadavg"] for r in records if r.info.get("loadavg") is not None})
    if not loads:
        return ""
    cpus = records[0].info.get("cpus") or 0
    note = f"1-minute load average during these runs: {loads[0]:.1f} to {loads[-1]:.1f} on {cpus or '?'} cores"
    if cpus and loads[-1] > 1.5 * cpus:
        note += " (other work shared the machine: CPU times are noisy; compare min and median)"
    return note + "."


# -- kernels, sampling, loader, largest batch -------------------------------------------------------------------------
def _kernel_section(res: Results, out_dir: Path, plots: bool) -> list[str]:
    md = ["## Low-rank kernel: Triton vs eager vs torch.compile", ""]
    recs = [r for r in res.records if "impl" in r.info and "tokens" in r.info]
    gpu = [r for r in recs if not r.info.get("interpreter") and not str(r.info.get("device", "cpu")).startswith("cpu")]
    if not gpu:
        n = len(recs)
        return md + [
            f"No GPU results yet ({n} CPU/interpreter run{'s' if n != 1 else ''} found, which only prove the benchmark code "
            "works). Run `python -m pytest benchmarks/test_bench_lowrank.py --full "
            "--benchmark-json=benchmarks/results/lowrank-<gpu>.json` on a GPU.",
            "",
        ]
    latest = _latest(
        gpu, lambda r: (r.info["impl"], r.info["tokens"], r.info["n"], r.info["m"], r.info["gelu"], r.info["backward"], r.info["device"])
    )
    cases = sorted({k[1:] for k in latest})
    rows, curves = [], {}
    for tokens, n, m, gelu, backward, device in cases:
        t = {
            impl: latest[(impl, tokens, n, m, gelu, backward, device)].stats.get("median")
            for impl in ("triton", "reference", "compiled")
            if (impl, tokens, n, m, gelu, backward, device) in latest
        }
        tri = t.get("triton")
        su_ref = t["reference"] / tri if tri and t.get("reference") else None
        su_comp = t["compiled"] / tri if tri and t.get("compiled") else None
        gbs = latest[("triton", tokens, n, m, gelu, backward, device)].info.get("gb_per_s") if tri else None
        rows.append(
            [
                str(tokens),
                f"{n}→{m}{' +GELU' if gelu else ''}",
                "fwd+bwd" if backward else "fwd",
                device,
                *(f"{t[i] * 1e3:.3f}" if t.get(i) else "-" for i in ("triton", "reference", "compiled")),
                f"{su_ref:.2f}×" if su_ref else "-",
                f"{su_comp:.2f}×" if su_comp else "-",
                f"{gbs:.0f}" if gbs else "-",
            ]
        )
        curves.setdefault((n, m, gelu, backward), []).append((tokens, su_ref, su_comp))
    md += [
        _table(["tokens", "map", "pass", "device", "Triton ms", "eager ms", "compiled ms", "vs eager", "vs compile", "Triton GB/s"], rows),
        "",
    ]
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for (n, m, gelu, backward), pts in sorted(curves.items()):
            pts.sort()
            lab = f"{n}→{m}{'+GELU' if gelu else ''} {'fwd+bwd' if backward else 'fwd'}"
            ax.plot([p[0] for p in pts if p[1]], [p[1] for p in pts if p[1]], marker="o", label=f"{lab} vs eager")
            ax.plot([p[0] for p in pts if p[2]], [p[2] for p in pts if p[2]], marker="x", linestyle="--", label=f"{lab} vs compile")
        ax.axhline(1, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed-up of the Triton kernel")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "kernel_speedup.png", dpi=110)
        plt.close(fig)
        md += ["![kernel speed-ups](kernel_speedup.png)", ""]
    return md


def _sampling_section(res: Results) -> list[str]:
    md = ["## Negative sampling (collected)", ""]
    rows = []
    for s in res.sampling:
        for r in s.get("results", []):
            rows.append(
                [
                    r.get("backend", "?"),
                    f"{r.get('np', 0):,}",
                    str(r.get("na", "")),
                    f"{r.get('median_ms', float('nan')):,.2f}",
                    f"{r.get('min_ms', float('nan')):,.2f}",
                    f"{r.get('peak_extra_mib', float('nan')):,.1f}",
                    str(s.get("device", "?")),
                    Path(s["path"]).name,
                ]
            )
    recs = _latest(
        [r for r in res.records if "backend" in r.info and "np" in r.info],
        lambda r: (r.info["backend"], r.info["np"], r.info.get("device")),
    )
    for (backend, np_, device), r in sorted(recs.items(), key=lambda kv: (str(kv[0][2]), kv[0][0], kv[0][1])):
        rows.append(
            [
                backend,
                f"{np_:,}",
                str(r.info.get("na", "")),
                f"{r.stats.get('median', float('nan')) * 1e3:,.2f}",
                f"{r.stats.get('min', float('nan')) * 1e3:,.2f}",
                mib(r.info.get("peak_extra_bytes")),
                str(device),
                f"{Path(r.source).name} ({r.meta.get('mode', '?')})",
            ]
        )
    if not rows:
        return md + ["No sampling results.", ""]
    return md + [_table(["backend", "pool Np", "anchors", "median ms", "min ms", "peak extra MiB", "device", "file"], rows), ""]


def _vs_original(info: dict[str, Any], orig: float | None) -> str:
    """The case's rate over the originals', with the range over rounds when the cases were timed in alternating rounds."""
    if not orig:
        return "-"
    by_round = info.get("vs_original_by_round")
    spread = f" ({min(by_round):.1f}-{max(by_round):.1f}× by round)" if by_round and len(by_round) > 1 else ""
    return f"{info['sequences_per_s'] / orig:.1f}×{spread}"


def _loader_section(res: Results) -> list[str]:
    md = ["## Data loader (collected)", ""]
    recs = _latest([r for r in res.records if r.info.get("kind") == "loader"], lambda r: r.info["case"])
    if recs:
        by_case = {case: r.info for case, r in recs.items()}
        orig = by_case.get("original", {}).get("sequences_per_s")
        rows = [
            [
                f"`{case}`",
                i["video"],
                f"{i['keyframe_seconds']:g} s",
                f"{i['sequences_per_s']:.3g}",
                f"{i['sequences_per_s_per_core']:.3g}",
                f"{i['sequences_per_cpu_s']:.3g}" if "sequences_per_cpu_s" in i else "-",
                _vs_original(i, orig),
                f"{i['data_wait_share_small']:.0%}",
                str(i["workers"]),
            ]
            for case, i in by_case.items()
        ]
        md += [
            "CPU loader at the paper data settings (T=15 × 32 frames at 16 fps, 112², 80×128 log-mel), the same generated "
            "videos fed three ways (`benchmarks/test_bench_loader.py`):",
            "",
            _table(
                [
                    "case",
                    "video",
                    "keyframes",
                    "sequences/s",
                    "per worker",
                    "per CPU-s, 1 core",
                    "vs original",
                    "small-run data wait",
                    "workers",
                ],
                rows,
            ),
            "",
        ]
    if not res.loader:
        return md + (["No results of the earlier bench_loader.py script.", ""] if recs else ["No loader results.", ""])
    rows = [
        [
            Path(d["path"]).name,
            f"{d.get('sequences_per_s')}",
            f"{d.get('seconds_per_sequence')}",
            str(d.get("batch_size")),
            str(d.get("workers")),
            str(d.get("cpus")),
            "quick" if d.get("quick") else "full",
            str(d.get("date")),
        ]
        for d in res.loader
    ]
    return md + [
        "Earlier runs of the removed `benchmarks/bench_loader.py` (CPU loader at the paper shapes, float32 batches):",
        "",
        _table(["file", "sequences/s", "s/sequence", "batch", "workers", "cpus", "mode", "date"], rows),
        "",
    ]


def _largest_batch_section(res: Results) -> list[str]:
    md = ["## Largest batch that fits (paper preset, T=15)", ""]
    recs = _latest([r for r in res.records if r.info.get("kind") == "largest_batch"], lambda r: (r.info["sharing"], r.info["device"]))
    if not recs:
        return md + ["No GPU results yet: `test_bench_step.py::test_largest_batch` runs on a CUDA device only.", ""]
    rows = [
        [f"`{s}`", dev, str(r.info["largest_batch"]), mib(r.info.get("memory_bytes")), str(len(r.info.get("trials", [])))]
        for (s, dev), r in sorted(recs.items(), key=lambda kv: _scheme_order(kv[0][0]))
    ]
    return md + [_table(["scheme", "device", "largest batch", "device MiB", "tries"], rows), ""]


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3g}"


def _gpu_check_section(res: Results) -> list[str]:
    md = ["## GPU check (`python -m avmt.bench gpu`)", ""]
    if not res.gpu_checks:
        return md + ["No GPU check results yet.", ""]
    for chk in sorted(res.gpu_checks, key=lambda c: str(c.get("date")), reverse=True):
        dev, parts = chk.get("device") or {}, chk.get("parts") or {}
        md += [
            f"### {dev.get('name', '?')}, {chk.get('date', '?')}{' (dry run)' if chk.get('dry_run') else ''}",
            "",
            f"`{Path(chk['path']).name}`, commit `{chk.get('commit')}`, {chk.get('total_s', '?')} s of a {chk.get('budget_s')} s budget; "
            f"torch {(chk.get('versions') or {}).get('torch')}, Triton {(chk.get('versions') or {}).get('triton')}",
            "",
        ]
        md += [
            _table(
                ["part", "status", "seconds", "note"],
                [
                    [p, r.get("status", "?"), str(r.get("seconds", "-")), str(r.get("reason") or r.get("note") or "")[:160]]
                    for p, r in parts.items()
                ],
            ),
            "",
        ]
        speed = (parts.get("sampling") or {}).get("speed") or []
        fast = (parts.get("sampling") or {}).get("fast_backend", "fast")
        if speed:
            md += [f"Negative sampling, `{fast}` backend (ms per call; D={speed[0].get('d')}, k={speed[0].get('k')}, Na = 15% of Np):", ""]
            md += [
                _table(
                    ["Np", fast, "reference", "C++ (CPU)", "vs reference", "syncs/call"],
                    [
                        [
                            str(r["np"]),
                            _ms(r.get(f"{fast}_s")),
                            _ms(r.get("reference_s")),
                            _ms(r.get("cpp_s")),
                            f"{r['reference_s'] / r[f'{fast}_s']:.1f}×" if r.get("reference_s") and r.get(f"{fast}_s") else "-",
                            str(r.get("syncs_per_call")),
                        ]
                        for r in speed
                    ],
                ),
                "",
            ]
        low = parts.get("lowrank") or {}
        acc = low.get("accuracy") or []
        if acc:
            worst = max(acc, key=lambda c: c["worst_ratio"])
            md += [
                f"Low-rank kernels: {sum(c['passed'] for c in acc)} of {len(acc)} accuracy cases within 2× of the reference "
                f"(worst ratio {worst['worst_ratio']:.2f}, {worst['dtype']} N={worst['n']} M={worst['m']} {worst['impl']}).",
                "",
            ]
        rows = [r for r in low.get("speed") or [] if "reference_fwd_bwd_s" in r]
        if rows:
            md += ["Low-rank map, forward+backward ms (speed-up of Triton over eager / over torch.compile):", ""]
            md += [
                _table(
                    ["N→M", "tokens", "dtype", "eager", "Triton", "compiled", "Triton vs eager", "vs compiled", "syncs"],
                    [
                        [
                            f"{r['n']}→{r['m']}{' +GELU' if r['gelu'] else ''}",
                            str(r["tokens"]),
                            r["dtype"],
                            _ms(r["reference_fwd_bwd_s"]),
                            _ms(r["triton_fwd_bwd_s"]),
                            _ms(r.get("compiled_fwd_bwd_s")),
                            f"{r['reference_fwd_bwd_s'] / r['triton_fwd_bwd_s']:.2f}×",
                            f"{r['compiled_fwd_bwd_s'] / r['triton_fwd_bwd_s']:.2f}×" if r.get("compiled_fwd_bwd_s") else "-",
                            str(r.get("triton_syncs_per_fwd_bwd")),
                        ]
                        for r in rows
                    ],
                ),
                "",
            ]
        steps = {s: r for s, r in ((parts.get("step") or {}).get("steps") or {}).items() if "seconds_per_step" in r}
        if steps:
            first = next(iter(steps.values()))
            md += [f"Pretraining step, `{first['preset']}` preset, batch {first['batch']} × T={first['clips']}, {first['precision']}:", ""]
            md += [
                _table(
                    ["scheme", "s/step", "sequences/s", "peak MiB", "estimated peak MiB", "estimate / allocator", "syncs/step"],
                    [
                        [
                            f"`{s}`",
                            f"{r['seconds_per_step']:.3g}",
                            f"{r['sequences_per_s']:.3g}",
                            mib(r.get("peak_allocated_bytes")),
                            mib(r.get("estimated_peak_bytes")),
                            f"{r['estimate_over_allocator']:.2f}" if r.get("estimate_over_allocator") else "-",
                            str(r.get("syncs_per_step")),
                        ]
                        for s, r in sorted(steps.items(), key=lambda kv: _scheme_order(kv[0]))
                    ],
                ),
                "",
            ]
        options = {n: r for n, r in ((parts.get("cnn_options") or {}).get("cnn_options") or {}).items() if "seconds_per_step" in r}
        if options:
            md += ["CNN memory options, `lowrank` pretraining step (`train.*` overrides of the preset):", ""]
            md += [
                _table(
                    ["option", "overrides", "s/step", "time / plain", "peak MiB", "estimated peak MiB", "estimate / allocator"],
                    [
                        [
                            name,
                            " ".join(f"`{o}`" for o in r["overrides"]) or "-",
                            f"{r['seconds_per_step']:.3g}",
                            f"{r['time_over_plain']:.2f}×" if r.get("time_over_plain") else "-",
                            mib(r.get("peak_allocated_bytes")),
                            mib(r.get("estimated_peak_bytes")),
                            f"{r['estimate_over_allocator']:.2f}" if r.get("estimate_over_allocator") else "-",
                        ]
                        for name, r in options.items()
                    ],
                ),
                "",
            ]
        largest = (parts.get("largest_batch") or {}).get("largest_batch") or {}
        if largest:
            md += ["Largest batch that fits:", ""]
            md += [
                _table(
                    ["scheme", "largest batch", "tries"],
                    [
                        [
                            f"`{s}`",
                            str(r.get("largest_batch", f"≥ {r.get('largest_batch_at_least')} (stopped)")),
                            str(len(r.get("trials", []))),
                        ]
                        for s, r in sorted(largest.items(), key=lambda kv: _scheme_order(kv[0]))
                    ],
                ),
                "",
            ]
    return md


def _peak_section(res: Results) -> list[str]:
    md = ["## Whole-step peak (`python -m avmt.bench peak`)", ""]
    if not res.peaks:
        return md + ["No peak results.", ""]
    for doc in res.peaks:
        md += [f"{doc['preset']} preset, batch {doc['batch']} × T={doc['clips']}, {doc['precision']}; {doc['device']}, {doc['date']}:", ""]
        rows = []
        for run, r in [*doc["runs"].items(), *doc.get("long", {}).items()]:  # "long": other T, named in the run
            res_ = r["results"]
            ratio = res_["none"]["peak_bytes"] / res_["lowrank"]["peak_bytes"] if {"none", "lowrank"} <= set(res_) else None
            for scheme, v in sorted(res_.items(), key=lambda kv: _scheme_order(kv[0])):
                rows.append(
                    [
                        run,
                        f"`{scheme}`",
                        mib(v["peak_bytes"]),
                        mib(v["parts"].get("ACT")),
                        mib(v["parts"].get("OPT")),
                        f"{ratio:.2f}×" if ratio and scheme == "lowrank" else "",
                        v["peak_at"],
                    ]
                )
        md += [_table(["run", "scheme", "peak MiB", "activations MiB", "AdamW state MiB", "none / lowrank", "peak at"], rows), ""]
    return md


def _sweep_section(res: Results) -> list[str]:
    md = ["## Whole-step peak over sequence length (`python -m avmt.bench peak-sweep`)", ""]
    if not res.sweeps:
        return md + ["No sweep results.", ""]
    for doc in res.sweeps:
        results = {k: r for k, r in doc.get("results", {}).items() if "peak_bytes" in r}
        clips = sorted({r["clips"] for r in results.values()})
        md += [f"{doc['preset']} preset, batch {doc['batch']}, fake tensors; {doc['device']}, {doc['date']}. Options:", ""]
        md += [f"- {name}: {note}" for name, note in doc.get("variants", {}).items()] + [""]
        at = {(r["variant"], r["precision"], r["scheme"], r["clips"]): r["peak_bytes"] for r in results.values()}
        rows = []
        for variant, precision in sorted({k[:2] for k in at}):
            for scheme in ("none", "lowrank"):
                if any(k[:3] == (variant, precision, scheme) for k in at):
                    rows.append([variant, precision, f"`{scheme}`", *[mib(at.get((variant, precision, scheme, t))) for t in clips]])
            pairs = [(at.get((variant, precision, "none", t)), at.get((variant, precision, "lowrank", t))) for t in clips]
            rows.append([variant, precision, "none / lowrank", *[f"{n / low:.2f}×" if n and low else "-" for n, low in pairs]])
        md += ["Peak MiB by T (clips of 2 s at the preset's spacing):", ""]
        md += [_table(["option", "precision", "scheme", *[f"T={t}" for t in clips]], rows), ""]
        fits = doc.get("fits") or {}
        if fits:
            budgets = list(next(iter(fits.values()))["budgets"])
            frows = []
            for f in fits.values():
                cells = []
                for g in budgets:
                    b = f["budgets"][g]
                    t = b.get("largest_clips", b.get("largest_clips_at_least"))
                    bound = "≥ " if "largest_clips_at_least" in b else ""
                    cells.append(f"{bound}{t:,}" + (" (extrapolated)" if b["extrapolated"] else ""))
                err = f.get("holdout_rel_error")
                frows.append([f["variant"], f["precision"], f"`{f['scheme']}`", *cells, f"{100 * err:.1f}%" if err is not None else "-"])
            md += [
                "Longest T that fits, from a quadratic fit of the peak in T through the measured points; the last column is "
                "the error of the fit through the shorter T when predicting the longest one:",
                "",
                _table(["option", "precision", "scheme", *[f"{g} GiB" for g in budgets], "hold-out error"], frows),
                "",
            ]
    return md


def render(res: Results, out_dir: str | Path, plots: bool = True) -> str:
    """The Markdown report; PNGs (when ``plots``) are written into ``out_dir``, next to where the Markdown goes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["# avmt benchmark report", "", "Generated by `python -m avmt.bench report` from:", ""]
    md += [
        f"- `{Path(s['path']).name}`: {s['kind']}, {s.get('mode') or '?'} mode, {s.get('device') or '?'}, torch {s.get('torch') or '?'}, "
        f"{s.get('date') or '?'}; `{s.get('command') or '?'}`"
        for s in res.sources
    ]
    md += [""]
    md += _gpu_check_section(res)
    md += _peak_section(res)
    md += _sweep_section(res)
    md += _memory_section(res, out_dir, plots)
    md += _speed_section(res, out_dir, plots)
    md += _largest_batch_section(res)
    md += _kernel_section(res, out_dir, plots)
    md += _sampling_section(res)
    md += _loader_section(res)
    if res.skipped:
        md += ["## Files not used", "", *[f"- {s}" for s in res.skipped], ""]
    return "\n".join(md)
