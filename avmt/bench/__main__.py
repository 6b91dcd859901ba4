"""``python -m avmt.bench``: run the benchmark suite, write the report, or print memory per scheme.

python -m avmt.bench run [--full] [--out benchmarks/results/NAME.json] [-- PYTEST ARGS]   # suite + report
python -m avmt.bench report [PATHS ...] [--out benchmarks/results/report.md] [--no-plots]
python -m avmt.bench memory [--preset paper] [--scope transformer|model] [--batch 4] [section.key=value ...]
python -m avmt.bench peak-sweep [--clips 15,30,60,120] [--fits 24,48,80,141] [--jobs 2] --out PATH
python -m avmt.bench gpu [--budget-s 480] [--out PATH] [--parts a,b] [--dry-run]      # one-shot GPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from avmt.config import SHARING_SCHEMES, Config, ConfigError, add_config_arguments, config_from_args

SUITE = ("test_bench_memory.py", "test_bench_step.py", "test_bench_lowrank.py", "test_bench_sampling.py", "test_bench_loader.py")


def _report(args: argparse.Namespace) -> int:
    from avmt.bench.report import load_results, render

    paths = args.paths or ["benchmarks/results"]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"python -m avmt.bench report: error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from avmt.bench.gpu import unwritable

    out = Path(args.out)
    why = unwritable(out)
    if why is not None:
        print(f"python -m avmt.bench report: error: {why}", file=sys.stderr)
        return 2
    res = load_results(paths, check=True)
    named = {str(Path(p)) for p in paths if not Path(p).is_dir()}
    refused = [s for s in res.skipped if s.split(": ", 1)[0] in named]
    if refused:  # a file named on the command line is not a result: say so (a folder's other JSON files are skipped)
        print(f"python -m avmt.bench report: error: {refused[0]}", file=sys.stderr)
        return 2
    if not res.sources:
        print(f"python -m avmt.bench report: error: no result files in {', '.join(paths)}", file=sys.stderr)
        return 1
    for line in res.skipped:
        print(f"python -m avmt.bench report: skipped {line}", file=sys.stderr)
    try:
        text = render(res, out.parent, plots=not args.no_plots)
    except ImportError as e:
        print(
            f"python -m avmt.bench report: {e}; install the plotting extra (pip install -e '.[bench]') or pass --no-plots", file=sys.stderr
        )
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} from {len(res.sources)} result files" + ("" if args.no_plots else f" (plots in {out.parent})"))
    return 0


def _run(args: argparse.Namespace) -> int:
    bench_dir = Path(args.benchmarks)
    if not (bench_dir / "conftest.py").exists():
        print(
            f"python -m avmt.bench run: {bench_dir} is not the benchmark folder; run from the repository root or pass --benchmarks",
            file=sys.stderr,
        )
        return 2
    mode = "full" if args.full else "quick"
    out = Path(args.out or f"benchmarks/results/suite-{mode}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [str(bench_dir / f) for f in (args.files or SUITE)]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *files,
        f"--benchmark-json={out}",
        *(["--full"] if args.full else []),
        *args.pytest_args,
    ]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"python -m avmt.bench run: pytest exited with {rc}; the JSON (if written) holds the cases that ran", file=sys.stderr)
    if args.no_report or not out.exists():
        return rc
    report_args = argparse.Namespace(paths=[str(out.parent)], out=str(out.parent / "report.md"), no_plots=args.no_plots)
    return rc or _report(report_args)


def _config_and_schemes(args: argparse.Namespace, command: str) -> tuple[Config | None, dict[str, Config]]:
    """The config from the arguments and one copy per ``--schemes`` entry; (None, {}) after printing the error."""
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"python -m avmt.bench {command}: error: {e}", file=sys.stderr)
        return None, {}
    names = args.schemes.split(",")
    unknown = [s for s in names if s not in SHARING_SCHEMES]
    if unknown or len(set(names)) != len(names):
        what = f"unknown scheme {unknown[0]!r}" if unknown else f"a scheme twice in {args.schemes!r}"
        print(f"python -m avmt.bench {command}: error: {what} (the schemes are {', '.join(SHARING_SCHEMES)})", file=sys.stderr)
        return None, {}
    for flag in ("batch", "clips"):
        value = getattr(args, flag, None)
        if isinstance(value, int) and value < 1:
            print(f"python -m avmt.bench {command}: error: --{flag} must be >= 1, got {value}", file=sys.stderr)
            return None, {}
    if isinstance(getattr(args, "clips", None), int) and args.clips > cfg.model.max_clips:
        print(
            f"python -m avmt.bench {command}: error: --clips {args.clips} is more than model.max_clips={cfg.model.max_clips} "
            "(the position tables' size): raise model.max_clips too",
            file=sys.stderr,
        )
        return None, {}
    return cfg, {s: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sharing=s)) for s in names}


def _refused(command: str, e: Exception | str) -> int:
    """A measurement refused its settings (mode, scope, device, a config the clips do not fit): one line, exit 2."""
    print(f"python -m avmt.bench {command}: error: {e}", file=sys.stderr)
    return 2


def _memory(args: argparse.Namespace) -> int:
    from avmt.bench.memory import measure_step

    args.overrides = ["model.sharing=none", "model.kernel=reference", *args.overrides]
    cfg, schemes = _config_and_schemes(args, "memory")
    if cfg is None:
        return 2
    try:
        rows = {
            s: measure_step(c, scope=args.scope, mode=args.mode, batch=args.batch, clips=args.clips, precision=args.precision)
            for s, c in schemes.items()
        }
    except ValueError as e:  # what measure_step cannot measure
        return _refused("memory", e)
    if args.json:
        print(json.dumps({s: r.to_dict() for s, r in rows.items()}, indent=1))
        return 0
    from avmt.bench.report import mib

    first = next(iter(rows.values()))
    print(
        f"avmt step memory: preset={cfg.preset} scope={args.scope} mode={args.mode} batch={first.batch} T={first.clips} "
        f"D={first.dim} L={first.layers} {first.precision}   (MiB)"
    )
    print(f"{'scheme':8} {'T.params':>12} {'weights':>10} {'grads':>10} {'AdamW':>10} {'T. w+g+opt':>11} {'activations':>12} {'total':>10}")
    for s, r in rows.items():
        print(
            f"{s:8} {r.params['transformer']:>12,} {mib(sum(r.weights.values())):>10} {mib(sum(r.grads.values())):>10} "
            f"{mib(sum(r.optimizer.values())):>10} {mib(r.train_state('transformer')):>11} {mib(r.activation_bytes):>12} "
            f"{mib(r.estimated_peak):>10}"
        )
    if "none" in rows and "lowrank" in rows:
        print(
            "Transformer w+g+opt, none / lowrank: "
            f"{rows['none'].train_state('transformer') / rows['lowrank'].train_state('transformer'):.2f}x"
        )
    return 0


def _peak(args: argparse.Namespace) -> int:
    from avmt.bench.peak import step_peak
    from avmt.bench.report import mib

    args.overrides = ["model.kernel=reference", f"train.precision={args.precision}", *args.overrides]
    cfg, schemes = _config_and_schemes(args, "peak")
    if cfg is None:
        return 2
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return _refused("peak", f"--device {args.device!r}: {str(e).strip().splitlines()[0]}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        return _refused("peak", f"--device {args.device}: no such CUDA device here")
    if device.type not in ("cpu", "cuda"):
        return _refused("peak", f"--device {args.device}: expected cpu, cuda or cuda:N")
    try:
        rows = {s: step_peak(c, args.batch, clips=args.clips, mode=args.mode, device=device, scope=args.scope) for s, c in schemes.items()}
    except ValueError as e:  # fake mode with --scope pretraining or a GPU device; clips the data settings cannot fit
        return _refused("peak", e)
    if args.json:
        print(json.dumps({s: r.to_dict() for s, r in rows.items()}, indent=1))
        return 0
    t = args.clips or cfg.data.num_clips
    print(
        f"avmt whole-step peak: preset={cfg.preset} scope={args.scope} batch={args.batch} T={t} {args.precision} mode={args.mode}   (MiB)"
    )
    print(f"{'scheme':8} {'peak':>10} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'temp':>9}  at")
    for s, r in rows.items():
        p = r.parts
        print(
            f"{s:8} {mib(r.peak_bytes):>10} {mib(p.get('PARAM')):>9} {mib(p.get('GRAD')):>9} {mib(p.get('OPT')):>9} "
            f"{mib(p.get('ACT')):>9} {mib(p.get('TEMP')):>9}  {r.peak_at}"
        )
    if "none" in rows and "lowrank" in rows:
        print(f"whole-step peak, none / lowrank: {rows['none'].peak_bytes / rows['lowrank'].peak_bytes:.2f}x")
    return 0


def _peak_sweep(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from avmt.bench.gpu import unwritable, write_json
    from avmt.bench.sweep import VARIANT_NOTES, fits_table, run_sweep

    def ints(text: str, what: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(0 < v < float("inf") for v in values):  # NaN fails the comparison too
            raise ValueError(f"{what}={text!r}: expected finite positive numbers, comma-separated")
        if what == "--clips" and not all(v == int(v) for v in values):
            raise ValueError(f"{what}={text!r}: expected whole numbers of clips")
        if len(set(values)) != len(values):
            raise ValueError(f"{what}={text!r}: a value is given twice")
        return values

    args.overrides = ["model.kernel=reference", *args.overrides]
    cfg, schemes = _config_and_schemes(args, "peak-sweep")
    if cfg is None:
        return 2
    try:
        clips, budgets = [int(t) for t in ints(args.clips, "--clips")], ints(args.fits, "--fits")
    except ValueError as e:
        print(f"python -m avmt.bench peak-sweep: error: {e}", file=sys.stderr)
        return 2
    names, precisions = args.variants.split(","), args.precisions.split(",")
    bad = [v for v in names if v not in VARIANT_NOTES] + [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        print(f"python -m avmt.bench peak-sweep: error: unknown variant or precision {bad[0]!r}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"python -m avmt.bench peak-sweep: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    out = Path(args.out)
    why = unwritable(out)
    try:
        doc = json.loads(out.read_text()) if why is None and out.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"--out {out} holds no readable JSON ({type(e).__name__}); it is rewritten with the points, so use another --out"
    if why is None and not (isinstance(doc, dict) and doc.get("bench", "peak sweep") == "peak sweep"):
        why = f"--out {out} is not a peak-sweep result (it would be overwritten); use another --out"
    if why is not None:
        print(f"python -m avmt.bench peak-sweep: error: {why}", file=sys.stderr)
        return 2
    if doc and (doc.get("preset"), doc.get("batch")) != (cfg.preset, args.batch):
        print(
            f"python -m avmt.bench peak-sweep: error: {out} holds preset={doc.get('preset')} batch={doc.get('batch')}; use another --out",
            file=sys.stderr,
        )
        return 2
    doc.update(
        bench="peak sweep",
        what="python -m avmt.bench peak-sweep: avmt.bench.peak.step_peak per point (fake tensors, scope=model: CNNs + "
        "Transformers + AdamW, steady-state second step); T at the preset's clip spacing",
        command="python -m avmt.bench " + " ".join(args.argv),
        device=f"cpu (fake tensors), {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        torch=torch.__version__,
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
        preset=cfg.preset,
        batch=args.batch,
        variants={v: VARIANT_NOTES[v] for v in names},
    )

    def save(d: dict) -> None:
        d["fits"] = fits_table(d.get("results", {}), budgets)
        write_json(out, d)

    run_sweep(cfg, args.batch, clips, names, precisions, list(schemes), doc, save, jobs=args.jobs)
    save(doc)
    errors = [k for k, r in doc["results"].items() if "error" in r]
    print(
        f"wrote {out}: {len(doc['results'])} points, {len(errors)} failed"
        + (f" ({errors[0]}: {doc['results'][errors[0]]['error']})" if errors else "")
    )
    return 1 if errors else 0


def _gpu(args: argparse.Namespace) -> int:
    from avmt.bench.gpu import run_check

    return run_check(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avmt.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("report", help="Markdown + PNG report from result JSON files")
    p.add_argument("paths", nargs="*", help="result JSON files or folders (default: benchmarks/results)")
    p.add_argument("--out", default="benchmarks/results/report.md", help="Markdown file; the PNGs go next to it")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(fn=_report)

    p = sub.add_parser("run", help="run the pytest-benchmark suite into a JSON file, then write the report")
    p.add_argument("--full", action="store_true", help="full sweeps (slow); default: quick mode")
    p.add_argument("--out", help="benchmark JSON (default: benchmarks/results/suite-<mode>-<date>.json)")
    p.add_argument("--benchmarks", default="benchmarks", help="the benchmark folder (default: ./benchmarks)")
    p.add_argument("--files", nargs="*", help=f"benchmark files in it (default: {' '.join(SUITE)})")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest after --, e.g. -- -k memory")
    p.set_defaults(fn=_run)

    p = sub.add_parser("memory", help="print the memory of one training step per sharing scheme")
    add_config_arguments(p)
    p.add_argument("--scope", choices=["transformer", "model"], default="transformer")
    p.add_argument("--mode", choices=["fake", "real"], default="fake")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--clips", type=int, default=None, help="T (default: the config's data.num_clips)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--schemes", default=",".join(SHARING_SCHEMES))
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_memory)

    p = sub.add_parser("peak", help="peak memory of a whole training step per sharing scheme (avmt.bench.peak)")
    add_config_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--clips", type=int, default=None, help="T (default: the config's data.num_clips)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--schemes", default=",".join(SHARING_SCHEMES))
    p.add_argument("--mode", choices=["fake", "real"], default="fake", help="fake: FakeTensorMode estimate; real: real tensors")
    p.add_argument("--device", default="cpu", help="with --mode real: cuda to measure a GPU (and its allocator peak)")
    p.add_argument(
        "--scope",
        choices=["model", "pretraining"],
        default="model",
        help="model: CNNs + Transformers + AdamW (fake or real); pretraining: the whole objective (real only)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_peak)

    p = sub.add_parser("peak-sweep", help="whole-step peak over T x memory option x precision x scheme, and the longest T per budget")
    add_config_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--clips", default="15,30,60,120", help="sequence lengths T, comma-separated")
    p.add_argument("--variants", default="plain,cnn_checkpoint,clips_with_grad", help="memory options (avmt.bench.sweep.variants)")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--schemes", default="none,lowrank")
    p.add_argument("--fits", default="24,48,80,141", help="memory budgets in GiB for the longest-T table")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (points run in parallel)")
    p.add_argument("--out", required=True, help="JSON, rewritten after every point; points already in it are kept")
    p.set_defaults(fn=_peak_sweep)

    p = sub.add_parser("gpu", help="the one-shot GPU check: every GPU path, JSON written after each part (avmt.bench.gpu)")
    from avmt.bench.gpu import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_gpu)

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # recorded by the GPU check
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
