"""avmt.bench.report and python -m avmt.bench report: rendering measured records."""

from __future__ import annotations

import json
import os

import pytest
import torch
from bad_input import refused, snapshot

from avmt.bench.__main__ import main as bench_main
from avmt.bench.memory import measure_step
from avmt.bench.report import load_results, memory_records, render, transformer_ratio
from avmt.config import SHARING_SCHEMES, load_config


# -- report ------------------------------------------------------------------------------------------------------------
def _bench_json(path, records, mode="quick", date="2026-01-01"):
    path.write_text(
        json.dumps(
            {
                "datetime": "2026-01-01T00:00:00",
                "machine_info": {},
                "avmt": {
                    "device": "cpu: test",
                    "torch": torch.__version__,
                    "mode": mode,
                    "date": f"{date}T00:00:00+00:00",
                    "command": "pytest benchmarks",
                },
                "benchmarks": [{"name": n, "stats": st, "extra_info": info} for n, st, info in records],
            }
        )
    )


def test_report_renders_measured_records(tmp_path):
    """From a JSON of real measure_step records: the ratio, the tables, the plots, and no GPU numbers invented."""
    records = []
    for s in SHARING_SCHEMES:
        cfg = load_config("tiny", overrides=[f"model.sharing={s}"])
        r = measure_step(cfg, scope="transformer", mode="fake", batch=2)
        records.append((f"mem[{s}]", {"mean": 0.1}, dict(kind="memory", preset="paper", variant="paper", **r.to_dict())))
        records.append(
            (
                f"step[{s}]",
                {"mean": 0.5, "min": 0.4, "median": 0.45, "max": 0.7, "rounds": 3},
                dict(
                    kind="step",
                    preset="tiny",
                    sharing=s,
                    batch=2,
                    clips=4,
                    device="cpu",
                    precision="fp32",
                    sequences_per_s=4.0,
                    loadavg=1.5,
                    cpus=2,
                ),
            )
        )
    _bench_json(tmp_path / "suite.json", records)
    (tmp_path / "junk.json").write_text("[1, 2]")
    res = load_results([tmp_path])
    ratio = transformer_ratio(memory_records(res))
    none, lowrank = (next(i for _, _, i in records if i.get("kind") == "memory" and i["sharing"] == s) for s in ("none", "lowrank"))
    # fp32 weights + gradients + 3 AMSGrad buffers: 20 bytes per parameter, so the byte ratio is the parameter ratio
    assert ratio["ratio"] == pytest.approx(none["params"]["transformer"] / lowrank["params"]["transformer"])
    out = tmp_path / "out"
    md = render(res, out)
    assert f"{ratio['ratio']:.1f}× smaller" in md
    assert f"{none['params']['transformer']:,}" in md
    assert "No GPU results yet" in md and "junk.json" in md
    for png in ("memory_transformer_paper_b2_t4_fp32.png", "speed_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in md


def test_report_kernel_speedups_only_from_gpu_records(tmp_path):
    def rec(impl, ms, device="NVIDIA H100", interp=False):
        return (
            f"k[{impl}]",
            {"median": ms / 1e3, "mean": ms / 1e3},
            dict(impl=impl, tokens=4096, n=768, m=3072, gelu=True, backward=False, device=device, interpreter=interp, gb_per_s=100.0),
        )

    _bench_json(tmp_path / "cpu.json", [rec("triton", 50.0, "cpu (2 threads)", True), rec("reference", 1.0, "cpu (2 threads)")])
    md = render(load_results([tmp_path / "cpu.json"]), tmp_path, plots=False)
    assert "No GPU results yet" in md
    _bench_json(tmp_path / "gpu.json", [rec("triton", 1.0), rec("reference", 2.5), rec("compiled", 1.5)], mode="full")
    md = render(load_results([tmp_path / "gpu.json"]), tmp_path)
    assert "2.50×" in md and "1.50×" in md and (tmp_path / "kernel_speedup.png").exists()


def test_report_cli(tmp_path, capsys):
    assert bench_main(["report", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench_main(["report", str(empty), "--out", str(tmp_path / "r.md")]) == 1
    cfg = load_config("tiny", overrides=["model.sharing=lowrank"])
    r = measure_step(cfg, batch=1)
    _bench_json(empty / "x.json", [("m", {"mean": 1.0}, dict(kind="memory", preset="tiny", variant="tiny", **r.to_dict()))])
    assert bench_main(["report", str(empty), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    assert "`lowrank`" in (tmp_path / "r.md").read_text()


def test_report_renders_whole_step_peaks(tmp_path):
    runs = {
        "plain": {
            "command": "python -m avmt.bench peak ...",
            "results": {
                "none": {"peak_bytes": 4 * 2**30, "parts": {"ACT": 3 * 2**30, "OPT": 2**29}, "peak_at": "model.cnn (peak_bw)"},
                "lowrank": {"peak_bytes": 2 * 2**30, "parts": {"ACT": 2**30, "OPT": 2**27}, "peak_at": "model (peak_bw)"},
            },
        },
    }
    doc = {
        "bench": "whole-step peak",
        "device": "cpu",
        "torch": "2.13",
        "date": "2026-12-01",
        "preset": "paper",
        "batch": 4,
        "clips": 15,
        "precision": "bf16",
        "runs": runs,
    }
    (tmp_path / "peak.json").write_text(json.dumps(doc))
    md = render(load_results([tmp_path]), tmp_path, plots=False)
    assert "| plain | `lowrank` | 2,048.0 | 1,024.0 | 128.0 | 2.00× | model (peak_bw) |" in md
    assert "| plain | `none` | 4,096.0 | 3,072.0 | 512.0 |  | model.cnn (peak_bw) |" in md


def test_report_renders_a_peak_sweep(tmp_path):
    from avmt.bench.sweep import fits_table

    gib = 1024**3
    results = {
        f"T={t} cnn_checkpoint bf16 {s}": {"clips": t, "variant": "cnn_checkpoint", "precision": "bf16", "scheme": s, "peak_bytes": p}
        for t in (15, 30, 60, 120)
        for s, p in (("none", 4 * gib + t * 2**20), ("lowrank", 2 * gib + t * 2**20))
    }
    doc = {"bench": "peak sweep", "preset": "paper", "batch": 4, "device": "cpu", "date": "2026-12-01", "results": results}
    doc["variants"] = {"cnn_checkpoint": "train.cnn_checkpoint=true train.cnn_chunk=4"}
    doc["fits"] = fits_table(results, [24])
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    md = render(load_results([tmp_path]), tmp_path, plots=False)
    assert "| cnn_checkpoint | bf16 | `lowrank` | 2,063 | 2,078 | 2,108 | 2,168 |" in md.replace(".0 ", " ")
    assert "| cnn_checkpoint | bf16 | none / lowrank | 1.99× |" in md
    assert "| cnn_checkpoint | bf16 | `lowrank` | 22,528 (extrapolated) | 0.0% |" in md  # (24 GiB - 2 GiB) / 1 MiB per clip


def test_report_renders_the_loader_cases(tmp_path):
    base = {"kind": "loader", "workers": 2, "keyframe_seconds": 10.0, "data_wait_share_small": 0.5}
    records = [
        (
            "a",
            {"median": 1},
            base | {"case": "original", "video": "1280x720 h264 25 fps", "sequences_per_s": 0.5, "sequences_per_s_per_core": 0.25},
        ),
        (
            "b",
            {"median": 1},
            base
            | {"case": "transcoded", "video": "284x160 h264 16 fps", "sequences_per_s": 6.0, "sequences_per_s_per_core": 3.0}
            | {"keyframe_seconds": 1.0, "data_wait_share_small": 0.1, "sequences_per_cpu_s": 5.2},
        ),
    ]
    _bench_json(tmp_path / "loader.json", records, mode="full")
    md = render(load_results([tmp_path]), tmp_path, plots=False)
    assert "| `original` | 1280x720 h264 25 fps | 10 s | 0.5 | 0.25 | - | 1.0× | 50% | 2 |" in md  # older record: no CPU-s
    assert "| `transcoded` | 284x160 h264 16 fps | 1 s | 6 | 3 | 5.2 | 12.0× | 10% | 2 |" in md
    side = {"kind": "loader_side_by_side", "workers": 2, "rounds": 2, "cases": []}
    for case, rate, ratios in (("original", 0.9, [1.0, 1.0]), ("transcoded", 9.9, [10.5, 11.7])):
        side["cases"].append({**base, "case": case, "video": "v", "sequences_per_s": rate, "sequences_per_s_per_core": rate / 2})
        side["cases"][-1]["vs_original_by_round"] = ratios
    _bench_json(tmp_path / "loader2.json", [("side", {"median": 60}, side)], mode="full", date="2026-12-02")
    md = render(load_results([tmp_path]), tmp_path, plots=False)
    assert "| `transcoded` | v | 10 s | 9.9 | 4.95 | - | 11.0× (10.5-11.7× by round) | 50% | 2 |" in md  # the newer run wins


BAD_REPORT = {  # name: (file contents, or None for a FIFO, extra arguments, what the one line says); exit 2
    "not JSON": ("{results: 1", [], "junk.json: not JSON (JSONDecodeError"),
    "binary junk": (b"\xff\xfe\x00junk", [], "junk.json: not JSON (UnicodeDecodeError"),
    "a JSON list": ("[1, 2]", [], "junk.json: not a result file this report knows"),
    "benchmarks that are not records": ('{"benchmarks": [1, 2]}', [], "junk.json: not a valid result file (AttributeError"),
    "a peak file without runs": ('{"bench": "whole-step peak"}', [], "junk.json: not a valid result file (KeyError"),
    "a GPU check of junk": ('{"kind": "avmt-gpu-check", "parts": 7}', [], "junk.json: not a valid python -m avmt.bench gpu result"),
    "a sweep of junk": ('{"bench": "peak sweep", "results": [1]}', [], "junk.json: not a valid"),
    "a FIFO": (None, [], "junk.json: not a regular file"),
    "out is a folder": ("{}", ["--out", "{tmp}"], "is a folder; name the file to write"),
    "out under a file": ("{}", ["--out", "{tmp}/file/r.md"], "file is not a writable folder"),
    "missing input": ("{}", ["{tmp}/none.json"], "error: not found: "),
}


@pytest.mark.parametrize("case", list(BAD_REPORT))
def test_bad_input_is_a_one_line_error_that_changes_nothing(tmp_path, monkeypatch, capsys, case):
    content, extra, message = BAD_REPORT[case]
    junk = tmp_path / "junk.json"
    if content is None:
        os.mkfifo(junk)  # reading it would block forever
    else:
        junk.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    extra = [a.format(tmp=tmp_path) for a in extra]
    inputs, options = [a for a in extra if a.endswith(".json")], [a for a in extra if not a.endswith(".json")]
    argv = ["report", *inputs, str(junk), "--out", str(tmp_path / "r.md"), *options]
    before = snapshot(tmp_path)
    code, line, out = refused(bench_main, argv, capsys)
    assert code == 2 and line.startswith("python -m avmt.bench report: error: ") and message in line, line
    assert out == "" and snapshot(tmp_path) == before


def test_a_junk_file_in_a_folder_is_skipped_with_its_reason(tmp_path, capsys):
    cfg = load_config("tiny", overrides=["model.sharing=lowrank"])
    r = measure_step(cfg, batch=1)
    _bench_json(tmp_path / "good.json", [("m", {"mean": 1.0}, dict(kind="memory", preset="tiny", variant="tiny", **r.to_dict()))])
    (tmp_path / "junk.json").write_text('{"bench": "whole-step peak"}')
    assert bench_main(["report", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 0
    assert "skipped " + str(tmp_path / "junk.json") + ": not a valid result file (KeyError" in capsys.readouterr().err
    assert "`lowrank`" in (tmp_path / "r.md").read_text()
