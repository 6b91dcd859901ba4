"""The CPU (PyAV) and DALI loaders: batch contract, windowed decoding, equivalence, failures, memory."""

import dataclasses
import gc
import logging

import numpy as np
import pytest
import torch
from data_fixtures import SR, TEST_CFG, make_synth

from avmt.data.loader_cpu import CPULoader, SequenceDataset, plan_sample
from avmt.data.media import read_frames
from avmt.data.prepare import load_manifest, prepare, scan_root
from avmt.data.clips import sample_rng

B = 2


@pytest.fixture(autouse=True)
def free_dali_pipelines():
    """Collect each test's DALI loaders (reference cycles) so that their prefetching threads are gone before a
    later test forks worker processes (a fork while such a thread holds a lock can deadlock the child)."""
    yield
    gc.collect()


def prepared(tmp_path_factory, fmt: str):
    root = tmp_path_factory.mktemp(f"videos_{fmt}")
    make_synth(root / "long", fmt, count=4, seconds=10.0)
    make_synth(root / "short", fmt, count=1, seconds=5.0, seed=1)  # shorter than the 8 s window
    out = root / "prepared"
    items = scan_root(root / "long") + scan_root(root / "short")
    s = prepare(items, out, sample_rate=SR, min_seconds=2.0, progress=False)
    assert s.kept == 5, s
    return out


@pytest.fixture(autouse=True)
def _destroy_dali_pipelines():
    """Free every unreachable DALI pipeline in this process after each test. Left in a reference cycle, a pipeline
    is destroyed by the garbage collector of whichever process runs it next, e.g. a worker that a later test forks
    (prepare's pool, a DataLoader): there DALI's threads do not exist and the destructor waits for them forever.
    Seen as a hang in test_data_prepare when the tests before it had shifted the GC's timing."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def webm(tmp_path_factory):
    return prepared(tmp_path_factory, "webm")


def check_contract(batch, cfg, b):
    t, f, c = cfg.num_clips, cfg.frames, cfg.crop_size
    assert batch["video"].shape == (b, t, 3, f, c, c) and batch["video"].dtype == torch.float32
    assert batch["audio"].shape == (b, t, 1, cfg.n_mels, cfg.mel_frames) and batch["audio"].dtype == torch.float32
    assert batch["label"].shape == (b,) and batch["label"].dtype == torch.int64
    assert batch["index"].shape == (b,) and batch["index"].dtype == torch.int64
    assert torch.isfinite(batch["video"]).all() and torch.isfinite(batch["audio"]).all()
    # Normalised with mean 0.45 / std 0.225: values span [-2, 2.44].
    assert batch["video"].min() >= -2.0 - 1e-5 and batch["video"].max() <= 2.4445 + 1e-4


def test_windowed_decoding_matches_a_full_decode(webm):
    import av

    rec = load_manifest(webm)[0]
    with av.open(rec["path"]) as c:
        full = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
    assert len(full) == rec["num_frames"]
    idx = np.array([70, 3, 4, 5, 40, 41, 79, 0, 3, 25])
    np.testing.assert_array_equal(read_frames(rec["path"], idx, rec["fps"], seek_gap_seconds=0.5), full[idx])
    np.testing.assert_array_equal(read_frames(rec["path"], np.array([79, 200]), rec["fps"]), full[[79, 79]])


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
    assert not torch.equal(torch.cat([b["index"] for b in e0]), torch.cat([b["index"] for b in e1])) or not torch.equal(e0[0]["video"], e1[0]["video"])
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
        ref = ((x.float() / 255 - 0.45) / 0.225).reshape(4, 4, 3, 48, 48).transpose(1, 2)
        torch.testing.assert_close(out["video"], ref, atol=1e-5, rtol=0)
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


# ---- DALI ------------------------------------------------------------------------------------------

dali = pytest.importorskip("nvidia.dali")


def test_dali_cpu_pipeline_matches_the_cpu_loader_in_eval(webm):
    from avmt.data.loader_dali import DALILoader

    cfg = TEST_CFG
    ref = list(CPULoader(webm, cfg, B, train=False, num_workers=0))
    dl = DALILoader(webm, cfg, B, train=False, device_id=None)
    assert len(dl) == len(ref) == 3
    got = list(dl)
    assert len(got) == 3
    for a, b in zip(ref, got):
        check_contract(b, cfg, len(a["label"]))
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
        torch.testing.assert_close(b["audio"], a["audio"], atol=1e-4, rtol=1e-5)  # same samples, same log-mel
        diff = (a["video"] - b["video"]).abs()
        # Decoder tolerance: DALI's and PyAV's FFmpeg convert YUV->RGB with different rounding/filters; the 1% worst
        # pixels are the edges of the saturated target, where 4:2:0 chroma is upsampled differently (0.37 measured).
        assert diff.mean() < 0.06 and torch.quantile(diff.flatten()[::7], 0.99) < 0.5, (diff.mean(), diff.max())
    again = list(DALILoader(webm, cfg, B, train=False, device_id=None))
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(got, again))


def test_dali_train_uses_the_same_plans_and_shards(webm):
    from avmt.data.loader_dali import DALILoader

    cfg = dataclasses.replace(TEST_CFG, spec_mask_rate=0.0)
    ref = list(CPULoader(webm, cfg, B, train=True, seed=3, num_workers=0))
    got = list(DALILoader(webm, cfg, B, train=True, seed=3, device_id=None))
    for a, b in zip(ref, got):
        check_contract(b, cfg, len(a["label"]))
        assert torch.equal(a["index"], b["index"])
        torch.testing.assert_close(b["audio"], a["audio"], atol=1e-4, rtol=1e-5)
        assert (a["video"] - b["video"]).abs().mean() < 0.08  # same crop/flip/scale (resamplers differ slightly)
    shards = [torch.cat([b["index"] for b in DALILoader(webm, cfg, B, train=True, seed=3, shard_id=s, num_shards=2)]) for s in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert set(torch.cat(shards).tolist()) == set(range(5))


def test_dali_replaces_unreadable_files(webm, caplog):
    from avmt.data.loader_dali import DALILoader

    recs = load_manifest(webm)
    broken = [dict(recs[0], path=str(webm / "gone.webm"))] + recs[1:]
    dl = DALILoader(broken, TEST_CFG, B, train=False, device_id=None)
    with caplog.at_level(logging.WARNING, logger="avmt.data"):
        got = list(dl)
    assert sum(len(b["label"]) for b in got) == len(broken) and dl.failures >= 1
    assert 0 not in torch.cat([b["index"] for b in got]).tolist() and "gone.webm" in caplog.text


def test_dali_gpu_graph_constructs_without_a_gpu(webm):
    """The GPU graph (mixed decoder, GPU resize/crop) is defined and its operator arguments checked here;
    only building it needs CUDA."""
    from avmt.data.loader_dali import DALILoader

    dl = DALILoader(webm, TEST_CFG, B, train=True, device_id=0)
    pipe = dl.construct()
    assert pipe.device_id == 0 and pipe.max_batch_size == B
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            pipe.build()


def test_dali_survives_a_decode_error_inside_the_graph(webm, caplog):
    from avmt.data.loader_dali import DALILoader

    recs = load_manifest(webm)
    fake = webm / "fake.webm"
    fake.write_bytes(b"not a video at all " * 100)  # readable on the host, fails in fn.decoders.video
    broken = recs[:2] + [dict(recs[2], path=str(fake))] + recs[3:]
    dl = DALILoader(broken, TEST_CFG, B, train=False, device_id=None, prefetch=1)
    with caplog.at_level(logging.WARNING, logger="avmt.data"):
        got = list(dl)
    loaded = torch.cat([b["index"] for b in got]).tolist()
    assert 2 not in loaded and dl.failures >= 1 and "DALI batch failed" in caplog.text
    assert sum(len(b["label"]) for b in got) + dl.failures == len(broken)
    for b in got:
        check_contract(b, TEST_CFG, len(b["label"]))


@pytest.mark.gpu
def test_dali_gpu_h264_decode(tmp_path_factory):
    """The GPU path: H.264 decoded by NVDEC, augmentation and log-mel on the GPU, no host copy of frames."""
    from avmt.data.loader_dali import DALILoader

    mp4 = prepared(tmp_path_factory, "mp4")
    ref = list(CPULoader(mp4, TEST_CFG, B, train=False, num_workers=0))
    got = list(DALILoader(mp4, TEST_CFG, B, train=False, device_id=0))
    for a, b in zip(ref, got):
        assert b["video"].is_cuda and b["audio"].is_cuda
        check_contract({k: v.cpu() for k, v in b.items()}, TEST_CFG, len(a["label"]))
        assert (a["video"] - b["video"].cpu()).abs().mean() < 0.06
        torch.testing.assert_close(b["audio"].cpu(), a["audio"], atol=1e-3, rtol=1e-4)


def test_dali_resumes_mid_epoch_and_streams_epochs_like_the_cpu_loader(webm):
    """set_epoch + iterate(k) give the batches of an uninterrupted run from batch k on; drop_last keeps full
    batches only; consecutive epochs stream on with the CPU loader's order."""
    from avmt.data.loader_dali import DALILoader

    cfg = dataclasses.replace(TEST_CFG, spec_mask_rate=0.0)
    dl = DALILoader(webm, cfg, B, train=True, seed=5, device_id=None, drop_last=True)
    assert len(dl) == 2  # 5 rows, batch 2: the partial batch is dropped
    full = [list(dl) for _ in range(2)]  # two epochs, the second streamed from the prefetched pipeline
    assert dl.epoch == 2 and all(len(b["label"]) == B for e in full for b in e)
    cpu = CPULoader(webm, cfg, B, train=True, seed=5, num_workers=0, drop_last=True)
    for epoch in range(2):
        cpu.set_epoch(epoch)
        assert [b["index"].tolist() for b in cpu.iterate()] == [b["index"].tolist() for b in full[epoch]]
    resumed = DALILoader(webm, cfg, B, train=True, seed=5, device_id=None, drop_last=True)
    resumed.set_epoch(1)
    got = list(resumed.iterate(1))
    assert len(got) == 1 and torch.equal(got[0]["index"], full[1][1]["index"]) and torch.equal(got[0]["video"], full[1][1]["video"])
    assert list(resumed.iterate(len(resumed))) == []
