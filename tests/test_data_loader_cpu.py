"""The CPU (PyAV) loader (avmt.data.loader_cpu): batch contract, windowed decoding, augmentation, failures, memory."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from data_fixtures import TEST_CFG, check_contract, prepared

from avmt.data.clips import sample_rng
from avmt.data.loader_cpu import CPULoader, SequenceDataset, _empty
from avmt.data.manifest import load_manifest
from avmt.data.media import read_frames
from avmt.data.sample import plan_sample

B = 2


@pytest.fixture(scope="module")
def webm(tmp_path_factory):
    return prepared(tmp_path_factory, "webm")


def test_windowed_decoding_matches_a_full_decode(webm):
    import av

    rec = load_manifest(webm)[0]
    with av.open(rec["path"]) as c:
        full = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
    assert len(full) == rec["num_frames"]
    idx = np.array([70, 3, 4, 5, 40, 41, 79, 0, 3, 25])
    np.testing.assert_array_equal(read_frames(rec["path"], idx, rec["fps"], seek_gap_seconds=0.5), full[idx])
    np.testing.assert_array_equal(read_frames(rec["path"], np.array([79, 200]), rec["fps"]), full[[79, 79]])
    np.testing.assert_array_equal(read_frames(rec["path"], idx, rec["fps"], threads=1), full[idx])  # no decoder threads


@pytest.mark.parametrize("size", [(40, 40), (96, 96), (48, 72)])
def test_rescaled_frames_match_an_antialiased_resize_and_the_box_is_close(webm, size):
    """read_frames' swscale rescale (down and up, aspect changed) is close to torch's antialiased bilinear
    resize of the RGB frames on average (a couple of levels), and ``box`` gives about that region of the rescaled frames."""
    rec = load_manifest(webm)[0]
    idx = np.array([0, 17, 18, 60])
    full = torch.from_numpy(read_frames(rec["path"], idx, rec["fps"])).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(full.float(), size=size, mode="bilinear", antialias=True).round().clamp(0, 255)
    got = read_frames(rec["path"], idx, rec["fps"], height=size[0], width=size[1])
    assert got.shape == (4, *size, 3) and got.dtype == np.uint8
    diff = (torch.from_numpy(got).permute(0, 3, 1, 2).float() - ref).abs()
    assert diff.mean() < 2.0, diff.mean()  # measured 0.7-1.3: the synthetic frames' hard edges are where resamplers differ
    box = (3, 5, size[0] - 7, size[1] - 9)
    cut = read_frames(rec["path"], idx, rec["fps"], height=size[0], width=size[1], box=box)
    assert cut.shape == (4, box[2], box[3], 3)
    # only the box's region is rescaled: close to cutting the rescaled frame (its region snaps to whole pixels)
    # measured 2.2-2.6 levels here (hard edges, 64-px frames: a source pixel is a large step); 1.0 at the paper's sizes
    assert np.abs(cut.astype(np.int16) - got[:, 3 : size[0] - 4, 5 : size[1] - 4]).mean() < 3.5


def test_frames_are_written_into_any_view_of_the_right_shape(webm):
    """``out=``: frames land in a caller's strided, mirrored view (a batch slot) exactly as they would be returned;
    2-D indices give 2-D frame grids; a view of the wrong shape is refused before anything is written."""
    rec = load_manifest(webm)[0]
    idx = np.array([[3, 4, 5], [40, 41, 41]])
    plain = read_frames(rec["path"], idx, rec["fps"], height=40, width=40, box=(2, 4, 32, 32))
    assert plain.shape == (2, 3, 32, 32, 3)
    np.testing.assert_array_equal(
        plain.reshape(6, 32, 32, 3), read_frames(rec["path"], idx.reshape(-1), rec["fps"], 40, 40, (2, 4, 32, 32))
    )
    batch = np.zeros((2, 3, 3, 32, 32), np.uint8)  # [T, C, F, h, w], as a video slot
    view = batch.transpose(0, 2, 3, 4, 1)[:, :, :, ::-1]
    got = read_frames(rec["path"], idx, rec["fps"], height=40, width=40, box=(2, 4, 32, 32), out=view)
    assert got is view
    np.testing.assert_array_equal(batch, plain[:, :, :, ::-1].transpose(0, 4, 1, 2, 3))
    with pytest.raises(ValueError, match="out has shape"):
        read_frames(rec["path"], idx, rec["fps"], height=40, width=40, box=(2, 4, 32, 32), out=np.zeros((2, 3, 32, 31, 3), np.uint8))


def test_a_batch_is_its_samples_loaded_into_one_set_of_tensors(webm):
    """``__getitems__`` (what a worker runs per batch) gives what the samples give one by one, replacements and
    failure counts included; in a worker its tensors are in shared memory, so the DataLoader sends them as they are."""
    recs = load_manifest(webm)
    broken = [dict(recs[0], path=str(webm / "gone.webm")), *recs[1:]]
    ds = SequenceDataset(broken, TEST_CFG, train=True, seed=2)
    keys = [(1, 0), (1, 3), (2, 1)]
    batch = ds.__getitems__(keys)
    samples = [ds[k] for k in keys]
    for name in ("video", "audio", "label", "index", "failures"):
        assert torch.equal(batch[name], torch.stack([s[name] for s in samples])), name
    assert batch["failures"][0] >= 1 and batch["index"][0] != 0  # row 0 is broken: replaced and counted
    assert not batch["video"].is_shared()  # in this process: plain memory
    shm = _empty((2, 3, 5), torch.float32, shared=True)  # what a worker allocates
    assert shm.is_shared() and shm.shape == (2, 3, 5) and shm.dtype == torch.float32 and shm.is_contiguous()
    loader = CPULoader(broken, TEST_CFG, B, train=True, seed=2, num_workers=1)
    from_worker = next(iter(loader))
    assert from_worker["video"].is_shared() and from_worker["video"].dtype == torch.uint8


def _ramp_frame(height: int, width: int, fmt: str = "yuv420p"):
    """A frame whose luma rises 2 levels per column and 1 per row (chroma flat): a misplaced region shows as an offset."""
    import av

    y = 16 + 2 * np.arange(width)[None, :] + np.arange(height)[:, None]
    rgb = np.repeat(np.clip(y, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=fmt)


@pytest.mark.parametrize(
    ("frame", "size", "box"),
    [((160, 284), (144, 256), (17, 101, 112, 112)), ((160, 284), (128, 228), (0, 116, 112, 112)), ((91, 135), (60, 89), (7, 3, 41, 50))],
)
def test_the_region_rescale_matches_rescaling_the_whole_frame(frame, size, box):
    """FrameConverter rescales only the box's preimage: on a ramp, its output is within a source pixel's worth of
    levels of rescaling the whole frame and cutting (a misplaced or misscaled region would be off by far more);
    odd frame sizes and positions included. Without a rescale, or for 4:4:4 frames, the cut is exact."""
    from avmt.data.media import FrameConverter

    f = _ramp_frame(*frame)
    top, left, h, w = box
    ref = FrameConverter(*size)(f)[top : top + h, left : left + w].astype(np.int16)  # the whole frame rescaled
    got = FrameConverter(*size, box)(f)
    assert got.shape == (h, w, 3)
    err = np.abs(got.astype(np.int16) - ref)
    # a source pixel is 2 levels across and 1 down: one pixel off each way and a level of rounding is 4 at most
    # (measured: 0 and 0 at the paper's sizes, mean 2.4 and max 4 for the odd one); a region misplaced by more shows
    assert err.mean() < 3.0 and err.max() <= 4, (err.mean(), err.max())
    f444 = _ramp_frame(*frame, fmt="yuv444p")
    whole = FrameConverter(*size)(f444)
    np.testing.assert_array_equal(FrameConverter(*size, box)(f444), whole[top : top + h, left : left + w])
    native = FrameConverter(frame[0], frame[1], box)(f)  # no rescale: the box cut from the converted frame
    np.testing.assert_array_equal(native, f.to_ndarray(format="rgb24")[top : top + h, left : left + w])


def test_cpu_loader_contract_and_determinism(webm):
    cfg = TEST_CFG
    ev = list(CPULoader(webm, cfg, B, train=False, num_workers=0))
    assert [len(b["label"]) for b in ev] == [2, 2, 1]
    for b in ev:
        check_contract(b, cfg, len(b["label"]))
    assert sorted(torch.cat([b["index"] for b in ev]).tolist()) == [0, 1, 2, 3, 4]
    labels = [r["label_index"] for r in load_manifest(webm)]
    assert torch.cat([b["label"] for b in ev]).tolist() == labels
    again = list(CPULoader(webm, cfg, B, train=False, num_workers=2))  # worker processes give the same data
    for a, b in zip(ev, again):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])

    tr = CPULoader(webm, cfg, B, train=True, seed=5, num_workers=0)
    e0 = list(tr)
    e0b = list(tr)
    tr.set_epoch(1)
    e1 = list(tr)
    assert all(torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"]) for a, b in zip(e0, e0b))
    assert not torch.equal(torch.cat([b["index"] for b in e0]), torch.cat([b["index"] for b in e1])) or not torch.equal(
        e0[0]["video"], e1[0]["video"]
    )
    for b in e0:
        check_contract(b, cfg, len(b["label"]))


def test_train_augmentation_is_shared_by_all_clips(webm):
    """One crop and flip per sequence: every clip of the train output equals the raw frames cut by the
    sequence's single crop plan (and flipped when it says so)."""
    cfg = dataclasses.replace(TEST_CFG, scale_range=(64, 64), spec_mask_rate=0.0)  # no rescale: crop + flip only
    ds = SequenceDataset(webm, cfg, train=True, seed=0)
    rec = ds.records[0]
    for attempt in range(20):
        out = ds.load(0, sample_rng(0, 0, 0, attempt))
        seq, crop = plan_sample(rec, cfg, True, sample_rng(0, 0, 0, attempt))
        frames = torch.from_numpy(read_frames(rec["path"], seq.frame_indices.reshape(-1), rec["fps"]))
        x = frames.permute(0, 3, 1, 2)[:, :, crop.top : crop.top + 48, crop.left : crop.left + 48]
        x = x.flip(-1) if crop.flip else x
        ref = x.reshape(4, 4, 3, 48, 48).transpose(1, 2)  # uint8: crop and flip only, exact
        assert torch.equal(out["video"], ref)
        if crop.flip:
            break
    else:
        pytest.fail("no flip drawn in 20 attempts")


def test_failing_samples_are_logged_counted_and_replaced(webm, caplog):
    recs = load_manifest(webm)
    broken = [dict(recs[0], path=str(webm / "gone.webm")), dict(recs[1], audio=str(webm / "gone.flac"))] + recs[2:]
    loader = CPULoader(broken, TEST_CFG, B, train=False, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="avmt.data"):
        batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == len(broken)  # every slot filled
    assert loader.failures >= 2
    loaded = torch.cat([b["index"] for b in batches]).tolist()
    assert 0 not in loaded and 1 not in loaded
    assert "gone.webm" in caplog.text and "gone.flac" in caplog.text
    all_broken = [dict(r, path=str(webm / "gone.webm")) for r in recs]
    with pytest.raises(RuntimeError, match="in a row failed"):
        list(CPULoader(all_broken, TEST_CFG, B, train=False, num_workers=0, max_retries=3))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_cpu_loader_memory_stays_flat(webm):
    loader = CPULoader(webm, TEST_CFG, B, train=True, num_workers=0)  # decode in this process, to see its RSS
    for epoch in range(4):  # warm-up: allocator pools, FFmpeg codec tables
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    before = rss_mib()
    for epoch in range(4, 16):  # 12 epochs x 5 sequences x 4 clips = 240 decoded clips, 960 frames
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    growth = rss_mib() - before
    # Calibrated: ~0 MiB here; never closing the containers (a leak) grows it by ~40 MiB.
    assert growth < 15, f"RSS grew by {growth:.1f} MiB over 60 sequences: a decoder or container leaks"


def test_persistent_workers_give_the_same_epochs_as_fresh_ones(webm):
    """With pinning (what build_loader asks for on CUDA) the workers live across epochs; their copy of the dataset
    never sees set_epoch, so the epoch travels with each key: epochs and a mid-epoch resume match fresh workers."""
    import warnings

    cfg = TEST_CFG
    fresh = CPULoader(webm, cfg, B, train=True, seed=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory ... no accelerator is found" on a CPU-only machine
        kept = CPULoader(webm, cfg, B, train=True, seed=3, num_workers=2, pin_memory=True)
        assert kept.persistent
        for epoch in (0, 1):
            fresh.set_epoch(epoch)
            kept.set_epoch(epoch)
            a, b = list(fresh.iterate()), list(kept.iterate())
            assert len(a) == len(b) and all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b))
            assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(a, b))
        workers = kept._dl._iterator._workers if kept._dl._iterator is not None else []
        assert workers and all(w.is_alive() for w in workers)  # the same processes, still there
        b1 = list(kept.iterate(1))
        assert torch.equal(b1[0]["index"], a[1]["index"]) and torch.equal(b1[0]["video"], a[1]["video"])
        kept.close()
        assert kept._dl is None


def _stuck_reader(path, indices, fps, **kwargs):
    """A frame reader that never returns (a decoder stuck on a file); module-level, so a spawned worker imports it."""
    import time

    time.sleep(3600)


@pytest.mark.timeout(120)
def test_a_batch_past_the_timeout_names_the_worker_and_its_file(webm):
    from avmt.data.loader import LoaderError

    cfg = dataclasses.replace(TEST_CFG, batch_timeout_s=4.0)
    loader = CPULoader(webm, cfg, B, train=False, num_workers=1)
    loader.dataset.frame_reader = _stuck_reader  # pickled into the worker with the dataset
    with pytest.raises(LoaderError) as e:
        next(iter(loader))
    msg = str(e.value)
    first = load_manifest(webm)[0]["path"]
    assert "\n" not in msg and "data.batch_timeout_s=4 s" in msg, msg
    assert "worker 0 (pid " in msg and f"reading {first} (manifest row 0) for " in msg, msg
    loader.close()


def test_workers_are_spawned_and_kept_across_epochs(webm):
    loader = CPULoader(webm, TEST_CFG, B, train=True, num_workers=1)
    loader.set_epoch(0)
    list(loader)
    workers = loader._dl._iterator._workers
    assert [type(w._popen).__module__ for w in workers] == ["multiprocessing.popen_spawn_posix"]  # not forked
    pids = [w.pid for w in workers]
    loader.set_epoch(1)
    list(loader)
    assert [w.pid for w in loader._dl._iterator._workers] == pids  # the same processes: start-up paid once
    loader.close()
