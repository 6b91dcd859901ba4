import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import avmt.checkpoint
from avmt.checkpoint import latest_checkpoint, load_checkpoint
from avmt.config import load_config
from avmt.models import AVBert
from avmt.objectives import Pretraining
from avmt.optim import lr_factor
from avmt.train import TrainingError, synthetic_manifest, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    os.environ["AVMT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return synthetic_manifest(load_config("tiny").data, count=12, progress=False)


def cfg_for(manifest, run_dir, *overrides):
    return load_config(
        "tiny",
        overrides=[
            f"data.manifest={manifest}",
            "data.num_workers=0",
            f"train.run_dir={run_dir}",
            "train.batch_size=4",
            "train.warmup_steps=2",
            "train.log_every=2",
            *overrides,
        ],
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(55, 10, 100, 0.1) < 1.0


def test_a_short_run_learns_logs_and_saves(manifest, tmp_path):
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=40", "train.save_every=20"), progress=False)
    rec = records(tmp_path)
    assert [r["step"] for r in rec] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rec[:10]) / 10, sum(r["loss"] for r in rec[-10:]) / 10
    assert last < first, (first, last)
    assert {"mep_visual_acc", "mep_multimodal_acc", "cpp_acc", "lr", "grad_norm"} <= set(rec[-1])
    assert latest_checkpoint(tmp_path).name == "step_000040" and summary["steps"] == 40
    assert any((tmp_path / "tensorboard").iterdir())
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 40 and state["config"]["model"]["dim"] == 64


def _cli(manifest, run_dir, *args, env=None):
    """``python -m avmt.train`` in a subprocess with the default thread count (OMP_NUM_THREADS unset)."""
    cmd = [sys.executable, "-m", "avmt.train", "--quiet", f"data.manifest={manifest}", f"train.run_dir={run_dir}"]
    cmd += ["train.batch_size=4", "train.warmup_steps=2", "train.log_every=2", *args]
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environ)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(manifest, tmp_path):
    """Bit for bit through the CLI with the default threads and loader workers: an uninterrupted run, a repeat of
    it, and one stopped at step 4 and resumed, whose log also held replayed steps and a torn line."""
    full, again, split = tmp_path / "full", tmp_path / "again", tmp_path / "split"
    steps = ["train.max_steps=8", "train.save_every=100"]
    for run in (full, again):
        assert (proc := _cli(manifest, run, *steps)).returncode == 0, proc.stderr[-2000:]
    assert (proc := _cli(manifest, split, *steps, "--stop-at", "4")).returncode == 0, proc.stderr[-2000:]
    assert latest_checkpoint(split).name == "step_000004"
    with open(split / "metrics.jsonl", "a") as f:  # steps 5-6 logged, then a kill before they were saved
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n" + json.dumps({"step": 6, "loss": 0.0}) + "\n" + '{"step": 7, "lo')
    assert (proc := _cli(manifest, split, *steps)).returncode == 0, proc.stderr[-2000:]  # resumes automatically
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in records(split)] == list(range(1, 9))  # one record per step
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(full)] == [r["loss"] for r in records(again)]
    a, b, c = (load_file(latest_checkpoint(d) / "model.safetensors") for d in (full, split, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_deterministic_switch_runs_and_is_put_back(manifest, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=2", "train.deterministic=true"), progress=False)
    assert summary["steps"] == 2 and not torch.are_deterministic_algorithms_enabled()


def test_resume_refuses_changed_settings_unless_asked(manifest, tmp_path):
    train(cfg_for(manifest, tmp_path, "train.max_steps=2"), progress=False)
    with pytest.raises(TrainingError, match=r"other settings \(train.lr: 0.001 -> 0.0005\).*--allow-config-change"):
        train(cfg_for(manifest, tmp_path, "train.max_steps=3", "train.lr=5e-4"), progress=False)
    assert train(cfg_for(manifest, tmp_path, "train.max_steps=3"), progress=False)["steps"] == 3  # a longer run is fine
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=4", "train.lr=5e-4"), progress=False, allow_config_change=True)
    assert summary["steps"] == 4


def test_zero_step_configs_are_refused_before_any_work(manifest, tmp_path):
    with pytest.raises(TrainingError, match="fewer than train.grad_accum=50: no optimizer step could ever be made"):
        train(cfg_for(manifest, tmp_path, "train.grad_accum=50"), progress=False)
    proc = subprocess.run([sys.executable, "-m", "avmt.train", "train.lr=inf"], capture_output=True, text=True)
    assert proc.returncode == 2 and "train.lr='inf' is invalid: expected a finite number" in proc.stderr


def test_nonfinite_gradients_of_a_finite_loss_are_a_skipped_step(manifest, tmp_path, monkeypatch):
    real_forward = Pretraining.forward
    calls = {"n": 0}

    def nan_grads_once(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss.register_hook(lambda g: g * float("nan"))  # the loss stays finite, every gradient is NaN
        return out

    monkeypatch.setattr(Pretraining, "forward", nan_grads_once)
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=3"), progress=False)
    assert summary["steps"] == 3 and summary["nonfinite_skipped"] == 1
    weights = load_file(latest_checkpoint(tmp_path) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_clip_features_are_a_skipped_step_not_a_crash(manifest, tmp_path, monkeypatch):
    """NaN in the CNN features used to make the negative sampler raise inside the forward."""
    real = AVBert.embed_visual
    calls = {"n": 0}

    def nan_once(self, *args, **kwargs):
        feats, tokens = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            feats, tokens = feats * float("nan"), tokens * float("nan")
        return feats, tokens

    monkeypatch.setattr(AVBert, "embed_visual", nan_once)
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=3"), progress=False)
    assert summary["steps"] == 3 and summary["nonfinite_skipped"] == 1


def test_a_crash_inside_a_checkpoint_write_keeps_the_previous_one(manifest, tmp_path, monkeypatch):
    cfg = cfg_for(manifest, tmp_path, "train.max_steps=4", "train.save_every=2")
    real_save = avmt.checkpoint.save_file
    calls = []

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies half-way
            real_save(tensors, path)
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(avmt.checkpoint, "save_file", failing_save)
    with pytest.raises(TrainingError, match="step 4 .*disk full; the previous checkpoints are intact"):
        train(cfg, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_000002"
    model = Pretraining(AVBert(cfg.model), cfg.objective)
    assert load_checkpoint(ckpt, model)["step"] == 2


def test_nonfinite_losses_are_skipped_then_stop_the_run(manifest, tmp_path, monkeypatch):
    real_forward = Pretraining.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 5):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Pretraining, "forward", sometimes_nan)
    summary = train(cfg_for(manifest, tmp_path / "a", "train.max_steps=6"), progress=False)
    assert summary["nonfinite_skipped"] == 2 and summary["steps"] == 6
    rec = records(tmp_path / "a")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rec) and rec[-1]["nonfinite_skipped"] == 2

    def always_inf(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(Pretraining, "forward", always_inf)
    with pytest.raises(TrainingError, match="3 non-finite losses or gradients in a row at step 0"):
        train(cfg_for(manifest, tmp_path / "b", "train.max_steps=6", "train.max_nonfinite=3"), progress=False)
    assert latest_checkpoint(tmp_path / "b") is not None  # a usable checkpoint is left behind


def test_missing_data_fails_before_any_work(tmp_path):
    cfg = load_config("tiny", overrides=[f"data.manifest={tmp_path / 'nope.jsonl'}", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match="nope.jsonl' does not exist"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    proc = subprocess.run([sys.executable, "-m", "avmt.train", "train.lr=fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "train.lr='fast' is invalid: expected a number" in proc.stderr


def test_torchrun_two_processes_save_once(manifest, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "avmt.train",
        "--preset",
        "tiny",
        f"data.manifest={manifest}",
        "data.num_workers=0",
        f"train.run_dir={tmp_path}",
        "train.batch_size=2",
        "train.max_steps=3",
        "--quiet",
        "--no-resume",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr  # DDP's warning when the search it was asked for finds nothing
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_000003"]
    assert proc.stdout.count("summary:") == 1
    assert len(records(tmp_path)) == 3


def test_linear_probe_and_split():
    from avmt.evaluate import linear_probe, split_of

    paths = [f"v/{i}.mp4" for i in range(2000)]
    assert [split_of(p, 0.3) for p in paths] == [split_of(p, 0.3) for p in paths]
    assert 0.25 < sum(split_of(p, 0.3) == "test" for p in paths) / 2000 < 0.35
    moved = [f"/elsewhere/data/{p}" for p in paths]  # the same files under another root: the same split
    assert [split_of(p, 0.3) for p in moved] == [split_of(p, 0.3) for p in paths]
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    y = torch.arange(200) % 5
    x = centers[y] + torch.randn(200, 16, generator=g)
    scores = linear_probe(x[None, :150], y[:150], x[None, 150:], y[150:], classes=5)
    assert scores["test_top1"] > 90 and scores["test_top5"] == 100.0
    noise = linear_probe(torch.randn(1, 150, 16, generator=g), y[:150], torch.randn(1, 50, 16, generator=g), y[150:], classes=5)
    assert noise["test_top1"] < 50  # labels unrelated to features: near chance (20%)


def test_evaluate_cli_compares_with_random_init(manifest, tmp_path):
    train(cfg_for(manifest, tmp_path, "train.max_steps=2"), progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "avmt.evaluate", "--checkpoint", str(tmp_path), "--compare-random", "--json", "--views", "2", "--quiet"],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for name in ("pretrained", "random_init"):
        assert set(out[name]) == {"visual", "audio", "audiovisual"}
        assert all(0 <= v <= 100 for s in out[name].values() for v in s.values())
    assert out["views"] == 2 and out["manifest"] == str(manifest)
    for cpp in out["pretrained_cpp"].values():  # the checkpoint's own CPP head on matched and swapped pairs, masked and not
        assert cpp["pairs"] == 2 * out["videos"] * 2 and all(0 <= cpp[k] <= 1 for k in ("accuracy", "matched", "swapped_other_class"))
    assert set(out["pretrained_cpp"]) == {"masked", "unmasked"}


def test_training_on_60_clip_sequences_from_long_synthetic_videos(tmp_path, monkeypatch):
    """2-minute sequences (T=60 clips of 2 s): the synthetic data is generated long enough, the loader plans and
    decodes 60 clips per sequence, and two steps train with the CNNs recomputed in chunks."""
    monkeypatch.setenv("AVMT_CACHE", str(tmp_path / "cache"))
    long = ["data.num_clips=60", "data.window_seconds=120", "model.max_clips=64"]
    data = load_config("tiny", overrides=long).data
    manifest = synthetic_manifest(data, count=4, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(rows) == 4 and min(r["duration"] for r in rows) >= 120
    cfg = cfg_for(
        manifest, tmp_path / "run", *long, "train.batch_size=2", "train.max_steps=2", "train.cnn_checkpoint=true", "train.cnn_chunk=16"
    )
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))


def _bad_manifest(tmp_path, manifest):
    lines = manifest.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1].replace('"fps": 8.0', '"fps": 0'), *lines[2:]]) + "\n")
    return bad


def _missing_videos(tmp_path, manifest):
    gone = tmp_path / "gone.jsonl"
    gone.write_text(manifest.read_text().replace("/videos/", "/moved-away/"))
    return gone


BAD_INPUTS = {  # name: (overrides, exit code, what the one-line error says)
    "lr inf": (["train.lr=inf"], 2, "train.lr='inf' is invalid: expected a finite number"),
    "batch 0": (["train.batch_size=0"], 2, "train.batch_size=0 is invalid"),
    "unknown key": (["train.lrr=1"], 2, "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    "no manifest": (["data.manifest=/nonexistent/m.jsonl"], 1, "does not exist; run python -m avmt.data.prepare first"),
    "malformed record": (["data.manifest={bad}"], 1, "line 2: fields duration=12.0, fps=0"),
    "run_dir under a file": (["train.run_dir={file}/run"], 1, "/file is not a directory"),
    "zero steps": (["train.grad_accum=1000"], 1, "no optimizer step could ever be made"),
    "sample rate": (["data.sample_rate=22050"], 1, "audio at 16000 Hz, but data.sample_rate=22050"),
    "too few videos": (["train.batch_size=16"], 1, "holds fewer videos than one batch of 16 per process"),
    "videos gone": (
        ["data.manifest={gone}", "train.batch_size=4", "train.max_steps=2"],
        1,
        "data loading stopped: 10 samples in a row failed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error(manifest, tmp_path, case):
    overrides, code, message = BAD_INPUTS[case]
    (tmp_path / "file").write_text("")
    paths = {"bad": _bad_manifest(tmp_path, manifest), "gone": _missing_videos(tmp_path, manifest), "file": tmp_path / "file"}
    args = [o.format(**paths) for o in overrides]
    cmd = [sys.executable, "-m", "avmt.train", "--quiet", f"data.manifest={manifest}", f"train.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [*cmd, "train.batch_size=4", *args], capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]


def _hung_rank_worker(rank: int, manifest: str, run_dir: str, out: str, port: int) -> None:
    """One rank of a 2-process gloo job; rank 1 hangs in its first step (it sleeps, it does not die)."""
    import time

    import avmt.train as t

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:
        t._accumulate = lambda *a, **k: time.sleep(90)  # longer than the test waits: rank 0 cannot simply finish
    cfg = cfg_for(manifest, run_dir, "train.max_steps=3", "train.dist_timeout_s=4", "train.batch_size=2")
    started = time.time()
    outcome: dict = {"error": None}
    try:
        t.train(cfg, progress=False)
    except Exception as e:  # the expected TrainingError, or anything else: recorded, so a failure says what happened
        outcome = {"error": f"{type(e).__name__}: {e}"}
    finally:
        if rank == 0:
            with open(out, "w") as f:
                json.dump(outcome | {"seconds": time.time() - started}, f)
            os._exit(0)  # without waiting for the hung rank: its process is killed by the spawn context


def test_a_hung_rank_fails_the_job_after_the_timeout(manifest, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    ctx = mp.start_processes(
        _hung_rank_worker, args=(str(manifest), str(tmp_path / "run"), str(out), port), nprocs=2, join=False, start_method="spawn"
    )
    ctx.processes[0].join(timeout=120)
    for p in ctx.processes:
        p.kill()
    assert out.exists(), "rank 0 neither failed nor finished within 120 s"
    result = json.loads(out.read_text())
    assert result["error"] and result["error"].startswith("TrainingError"), result
    assert "rank 0: a collective waited longer than train.dist_timeout_s=4 s" in result["error"]
    assert "another rank is hung or dead" in result["error"] and result["seconds"] < 60


def test_collective_timeouts_are_recognised_in_both_wordings():
    """gloo reports a collective that outwaited its timeout either as a wait that "timed out" or, when the timeout
    closed its connection first, as a pair closure (seen in CI); other distributed errors are not timeouts."""
    from avmt.train import is_collective_timeout

    assert is_collective_timeout(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 4000ms"))
    assert is_collective_timeout(RuntimeError("Application timeout caused pair closure"))
    assert not is_collective_timeout(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"))
    assert not is_collective_timeout(RuntimeError("CUDA out of memory"))


def test_no_resume_sets_the_earlier_runs_checkpoints_aside(manifest, tmp_path, capsys):
    """Starting over in a folder with an earlier, longer run: its checkpoints are moved aside (kept), so a later resume
    continues the new run, not the earlier run's higher steps."""
    train(cfg_for(manifest, tmp_path, "train.max_steps=4", "train.save_every=2"), progress=False)
    train(cfg_for(manifest, tmp_path, "train.max_steps=2", "train.save_every=2"), resume=False, progress=False)
    assert "the earlier run's checkpoints are now in" in capsys.readouterr().err
    (aside,) = tmp_path.glob("checkpoints.replaced-*")
    assert latest_checkpoint(tmp_path).name == "step_000002" and (aside / "step_000004").is_dir()
    summary = train(cfg_for(manifest, tmp_path, "train.max_steps=3", "train.save_every=2"), progress=False)
    assert summary["steps"] == 3 and [r["step"] for r in records(tmp_path)] == [1, 2, 3]  # the new run, continued


STUCK_RUN = """
import sys, time
import avmt.data.loader_cpu as lc
from avmt.train import main
def stuck_on_row(self, i, rng, out=None):
    time.sleep(3600)  # a decode that never returns
lc.SequenceDataset.load = stuck_on_row
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_a_stuck_run_writes_its_stacks_and_exits_with_its_checkpoint_intact(manifest, tmp_path):
    from avmt.checkpoint import find_checkpoint
    from avmt.watchdog import EXIT_CODE

    train(cfg_for(manifest, tmp_path, "train.max_steps=4"), progress=False, stop_at=2)
    args = [f"data.manifest={manifest}", "data.num_workers=0", f"train.run_dir={tmp_path}", "train.batch_size=4"]
    args += ["train.warmup_steps=2", "train.log_every=2", "train.max_steps=4", "train.watchdog_s=3", "--quiet"]
    t0 = __import__("time").monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK_RUN, *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == EXIT_CODE, proc.stderr[-2000:]
    assert __import__("time").monotonic() - t0 < 120
    line = proc.stderr.strip().splitlines()[-1]
    stacks = tmp_path / "hang-stacks-rank0.txt"
    assert line.startswith("avmt.train: error: no training step completed") and str(stacks) in line, proc.stderr[-2000:]
    text = stacks.read_text()
    assert "stuck_on_row" in text and "Thread" in text  # every thread's stack, the stuck one included
    found = find_checkpoint(tmp_path)
    assert found.path.name == "step_000002" and not found.skipped  # intact, and the run resumes from it
    assert train(cfg_for(manifest, tmp_path, "train.max_steps=4"), progress=False)["steps"] == 4


def test_watchdog_settings_are_checked():
    with pytest.raises(Exception, match="train.watchdog_s"):
        load_config("tiny", overrides=["train.watchdog_s=nan"])
    with pytest.raises(Exception, match="data.batch_timeout_s"):
        load_config("tiny", overrides=["data.batch_timeout_s=-1"])
