"""avmt.checkpoint under faults: a kill at every point of a write, damaged files, a lost pointer, a full disk,
pruning by step number. Kills are injected deterministically through save_checkpoint's ``fault`` hook."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn

import avmt.checkpoint as ck
from avmt.checkpoint import FAULT_POINTS, CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint, verify


class Killed(BaseException):
    """What a kill -9 leaves: the files as they are at that moment (BaseException: nothing catches it)."""


def _module(step: int) -> nn.Module:
    torch.manual_seed(step)
    return nn.Linear(4, 3)


def _save(run, step, fault=None, keep=3):
    return save_checkpoint(run, step, _module(step), {"step": step, "t": torch.full((2,), float(step))}, keep=keep, fault=fault)


def _kill_at(point):
    def hook(p):
        if p == point:
            raise Killed(p)

    return hook


def _loaded_step(run) -> int:
    found = find_checkpoint(run)
    assert found.path is not None, found.skipped
    m = nn.Linear(4, 3)
    state = load_checkpoint(found.path, m)
    assert torch.equal(m.weight, _module(state["step"]).weight)  # the weights are that step's
    return state["step"]


@pytest.mark.parametrize("point", [p for p in FAULT_POINTS if p != "moved_aside"])  # only a re-save moves aside
def test_a_kill_at_any_point_of_a_new_step_leaves_a_verified_checkpoint(tmp_path, point):
    _save(tmp_path, 10)
    with pytest.raises(Killed):
        _save(tmp_path, 20, fault=_kill_at(point))
    # once the manifest is written, the .tmp folder verifies and is as good as the renamed one
    done = FAULT_POINTS.index(point) >= FAULT_POINTS.index("manifest")
    assert _loaded_step(tmp_path) == (20 if done else 10)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_kill_while_a_step_is_saved_again_never_loses_it(tmp_path, point):
    """The case that used to lose a run: the last step saved twice (max_steps a multiple of save_every)."""
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    with pytest.raises(Killed):
        _save(tmp_path, 20, fault=_kill_at(point))
    assert _loaded_step(tmp_path) == 20
    _save(tmp_path, 30)  # and the run goes on from there, leaving no clutter behind
    assert _loaded_step(tmp_path) == 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000010", "step_000020", "step_000030"]


@pytest.mark.parametrize("name", ck.FILES)
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_checkpoint_is_skipped_with_the_reason(tmp_path, name, damage):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    f = newest / name
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside the weights / the pickled tensors, not the header
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    why = verify(newest)
    assert why is not None and name in why
    found = find_checkpoint(tmp_path)
    assert found.path.name == "step_000010" and found.skipped == [(newest, why)]
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(newest, nn.Linear(4, 3))


def test_a_just_verified_checkpoint_is_not_hashed_again(tmp_path, monkeypatch):
    path = _save(tmp_path, 10)
    assert find_checkpoint(tmp_path).path == path  # verified here
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage after the check: only a second hashing would see it
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.pt does not match its SHA-256"):
        load_checkpoint(path)
    calls = []
    real = ck._sha256
    monkeypatch.setattr(ck, "_sha256", lambda p: calls.append(p) or real(p))
    try:
        load_checkpoint(path, verified=True)
    except Exception:
        pass  # the damaged pickle may or may not load; what matters is that nothing was hashed
    assert calls == []


def test_the_pointer_is_only_a_hint(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.unlink()
    assert _loaded_step(tmp_path) == 20  # a deleted pointer no longer restarts the run from step 0
    pointer.write_text("step_000099\n")  # names nothing
    assert _loaded_step(tmp_path) == 20
    pointer.write_bytes(b"\x00\xff")
    assert _loaded_step(tmp_path) == 20


def test_pruning_keeps_the_highest_step_numbers(tmp_path):
    for step in (999_998, 999_999, 1_000_000, 1_000_001):  # 7 digits sort before 6 by name
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_1000000", "step_1000001"]
    assert _loaded_step(tmp_path) == 1_000_001


@pytest.mark.parametrize("where", ["save_file", "torch.save"])
def test_a_full_disk_is_a_clear_error_and_leaves_the_last_checkpoint(tmp_path, monkeypatch, where):
    _save(tmp_path, 10)

    def full(*args, **kwargs):
        if where == "torch.save":  # how torch reports ENOSPC from its C++ writer
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
            )
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "save_file":
        monkeypatch.setattr(ck, "save_file", full)
    else:
        monkeypatch.setattr(ck, "torch", _Torch(full))
    with pytest.raises(CheckpointError, match="cannot write the checkpoint of step 20") as e:
        _save(tmp_path, 20)
    assert "No space left" in str(e.value) or "file write failed" in str(e.value)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_000020.tmp").exists()
    assert _loaded_step(tmp_path) == 10


class _Torch:
    """``torch`` as seen by avmt.checkpoint, with ``save`` replaced."""

    def __init__(self, save):
        self.save = save

    def __getattr__(self, name):
        return getattr(torch, name)


def test_a_checkpoint_without_a_manifest_loads_only_when_asked(tmp_path):
    path = _save(tmp_path, 10)
    (path / ck.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_unverified=True)["step"] == 10


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("1536k")


def test_a_really_full_disk_keeps_the_last_checkpoint(small_disk):
    big = nn.Linear(300, 300)  # 361 KB of weights; with the state below a checkpoint is ~0.84 MB: one fits, two do not
    state = {"step": 1, "t": torch.zeros(400, 300)}
    save_checkpoint(small_disk, 1, big, state)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint of step 2 .*No space left on device"):
        save_checkpoint(small_disk, 2, big, state | {"step": 2})
    found = find_checkpoint(small_disk)
    assert found.path.name == "step_000001" and not found.skipped
    assert load_checkpoint(found.path, nn.Linear(300, 300))["step"] == 1
    assert not (small_disk / "checkpoints" / "step_000002.tmp").exists()  # the partial write is gone
