"""Guards: what training computes, and which checkpoints load, cannot change without a test noticing.

- Reference loss trajectories (tests/guards.py): the tiny preset's first 30 steps for each sharing scheme, at 1 and
  2 threads, each equal to the committed numbers of its thread count bit for bit (docs/training.md, "Determinism").
  A deliberate numerics change regenerates them with ``python tests/guards.py`` in the same commit.
"""

from __future__ import annotations

import json

import pytest
from guards import FIXTURES, SCHEMES, STEPS, THREADS, fixture_path, guard_manifest, trajectory


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return guard_manifest(tmp_path_factory.mktemp("guard"))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_loss_trajectory_is_the_committed_one(manifest, tmp_path, scheme, threads):
    want = json.loads(fixture_path(scheme).read_text())["threads"][str(threads)]
    got = trajectory(manifest, tmp_path, scheme, threads)
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g == w, (
            f"{scheme}, {threads} thread(s): step {step} differs from {fixture_path(scheme).name}: "
            + ", ".join(f"{k} {w.get(k)!r} -> {g.get(k)!r}" for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k))
            + " (a deliberate change: regenerate with python tests/guards.py and say why in the commit)"
        )


# A checkpoint of the tiny preset (lowrank, 2 steps of batch 4) written by avmt at c9fb06c: the format every later
# commit must keep loading, resuming and evaluating, or convert, or refuse with one line naming the version.
OLD_CHECKPOINT = FIXTURES / "checkpoint-tiny-format1"


def _run_with_old_checkpoint(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(OLD_CHECKPOINT, run / "checkpoints" / "step_000002")
    (run / "checkpoints" / "latest").write_text("step_000002")
    return run


def test_an_old_checkpoint_loads_with_its_model(tmp_path):
    from avmt.checkpoint import load_checkpoint, load_model

    state = load_checkpoint(OLD_CHECKPOINT)
    assert state["step"] == 2 and state["config"]["model"]["sharing"] == "lowrank"
    model, cfg = load_model(OLD_CHECKPOINT)
    assert cfg.model.sharing == "lowrank" and cfg.data.batch_timeout_s == 300.0  # a setting added later: its default
    assert sum(p.numel() for p in model.parameters()) > 0 and not model.training


def test_an_old_checkpoint_resumes(manifest, tmp_path):
    from avmt.config import load_config
    from avmt.train import train

    run = _run_with_old_checkpoint(tmp_path)
    overrides = [f"data.manifest={manifest}", "data.num_workers=0", f"train.run_dir={run}", "model.sharing=lowrank"]
    overrides += ["train.batch_size=4", "train.warmup_steps=2", "train.max_steps=4", "train.save_every=2"]
    # its data.manifest was a folder of the machine that wrote it: the move is the one accepted change
    summary = train(load_config("tiny", overrides=overrides), progress=False, allow_config_change=True)
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step_000004")


def test_an_old_checkpoint_evaluates(manifest, tmp_path, capsys):
    from avmt.evaluate import main

    args = ["--checkpoint", str(OLD_CHECKPOINT), "--manifest", str(manifest), "--heads", "audio", "--json", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["pretrained"]["audio"]["test_top1"] <= 100


def test_checkpoints_carry_their_format_and_a_newer_one_is_refused_in_one_line(tmp_path, capsys):
    import shutil

    from avmt.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, verify
    from avmt.evaluate import main

    assert "format" not in json.loads((OLD_CHECKPOINT / "manifest.json").read_text())  # written before the field: format 1
    newer = tmp_path / "newer"
    shutil.copytree(OLD_CHECKPOINT, newer)
    manifest = json.loads((newer / "manifest.json").read_text()) | {"format": FORMAT_VERSION + 1}
    (newer / "manifest.json").write_text(json.dumps(manifest))
    assert f"format {FORMAT_VERSION + 1} is newer" in verify(newer)
    with pytest.raises(CheckpointError, match="upgrade avmt"):
        load_checkpoint(newer)
    assert main(["--checkpoint", str(newer), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and f"checkpoint format {FORMAT_VERSION + 1}" in err[-1]


def test_a_new_checkpoint_records_the_current_format(manifest, tmp_path):
    from avmt.checkpoint import FORMAT_VERSION, latest_checkpoint
    from avmt.config import load_config
    from avmt.train import train

    overrides = [f"data.manifest={manifest}", "data.num_workers=0", f"train.run_dir={tmp_path}", "train.batch_size=4", "train.max_steps=1"]
    train(load_config("tiny", overrides=overrides), progress=False)
    assert json.loads((latest_checkpoint(tmp_path) / "manifest.json").read_text())["format"] == FORMAT_VERSION
