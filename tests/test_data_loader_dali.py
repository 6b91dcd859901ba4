"""The DALI loader (avmt.data.loader_dali) and training on it: the CPU pipeline (VP9) against the CPU loader,
shards, failures, resume; the H.264 GPU path (GPU-marked). The whole file is skipped where DALI is not installed."""

import dataclasses
import json
import logging

import pytest
import torch
from data_fixtures import SR, TEST_CFG, check_contract, make_synth, prepared
from safetensors.torch import load_file

from avmt.checkpoint import latest_checkpoint
from avmt.config import load_config
from avmt.data.loader import Loader, build_loader, select_loader
from avmt.data.loader_cpu import CPULoader
from avmt.data.manifest import load_manifest
from avmt.data.prepare import prepare, scan_root
from avmt.train import TrainingError, train

dali = pytest.importorskip("nvidia.dali")
B = 2


@pytest.fixture(scope="module")
def webm(tmp_path_factory):
    return prepared(tmp_path_factory, "webm")


@pytest.fixture(scope="module")
def webm_manifest(tmp_path_factory):
    """Four 10 s VP9/webm videos with sound, prepared (DALI's CPU decoder reads VP9, not H.264)."""
    root = tmp_path_factory.mktemp("loader_select")
    make_synth(root / "videos", "webm", count=4, seconds=10.0)
    s = prepare(scan_root(root / "videos"), root / "prepared", sample_rate=SR, min_seconds=2.0, progress=False)
    assert s.kept == 4, s
    return root / "prepared" / "manifest.jsonl"


def _video_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two uint8 video batches in units of the normalised input (1 = 0.225 * 255 levels)."""
    return (a.float().cpu() - b.float().cpu()).abs() / (255 * 0.225)


def test_dali_cpu_pipeline_matches_the_cpu_loader_in_eval(webm):
    from avmt.data.loader_dali import DALILoader

    cfg = TEST_CFG
    ref = list(CPULoader(webm, cfg, B, train=False, num_workers=0))
    dl = DALILoader(webm, cfg, B, train=False, device_id=None)
    assert isinstance(dl, Loader)
    assert len(dl) == len(ref) == 3
    got = list(dl)
    assert len(got) == 3
    for a, b in zip(ref, got):
        check_contract(b, cfg, len(a["label"]))
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
        torch.testing.assert_close(b["audio"], a["audio"], atol=1e-4, rtol=1e-5)  # same samples, same log-mel
        diff = _video_diff(a["video"], b["video"])
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
        assert _video_diff(a["video"], b["video"]).mean() < 0.08  # same crop/flip/scale (resamplers differ slightly)
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
        assert _video_diff(a["video"], b["video"]).mean() < 0.06
        torch.testing.assert_close(b["audio"].cpu(), a["audio"], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_dali_gpu_reads_transcoded_files(tmp_path):
    """prepare --transcode's H.264 copies through NVDEC, against the CPU loader on the same copies."""
    from avmt.data.loader_dali import DALILoader
    from avmt.data.transcode import TranscodeSettings

    make_synth(tmp_path / "videos", "mp4", count=4, seconds=10.0)
    settings = TranscodeSettings(short_side=TEST_CFG.scale_range[1], fps=TEST_CFG.fps)
    s = prepare(scan_root(tmp_path / "videos"), tmp_path / "prepared", SR, 2.0, progress=False, transcode=settings)
    assert s.kept == 4
    ref = list(CPULoader(tmp_path / "prepared", TEST_CFG, B, train=False, num_workers=0))
    got = list(DALILoader(tmp_path / "prepared", TEST_CFG, B, train=False, device_id=0))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert b["video"].is_cuda and b["video"].dtype == torch.uint8
        assert torch.equal(a["index"], b["index"].cpu()) and _video_diff(a["video"], b["video"]).mean() < 0.06


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


def test_dali_on_a_cpu_refuses_h264_before_any_work(webm_manifest, tmp_path):
    mp4 = tmp_path / "manifest.jsonl"  # the same rows, declared H.264: DALI's CPU decoder cannot read them
    mp4.write_text("".join(json.dumps(dict(r, video_codec="h264")) + "\n" for r in load_manifest(webm_manifest)))
    cfg = load_config("tiny", overrides=["data.loader=dali", f"data.manifest={mp4}", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match=r"only vp9, mjpeg: 4 of 4 videos are h264 .*data.loader=cpu"):
        train(cfg, progress=False, stop_at=1)
    assert not (tmp_path / "run").exists()


def test_training_on_dali_cpu_pipeline_runs_and_resumes_exactly(webm_manifest, tmp_path):
    """Three steps of batch 2 over 4 videos cross an epoch boundary; stopping after step 1 and resuming gives
    the same losses and weights (DALI's iterate(k) resumes mid-epoch like the CPU loader)."""

    def cfg(run):
        return load_config(
            "tiny",
            overrides=[
                "data.loader=dali",
                f"data.manifest={webm_manifest}",
                "data.num_workers=1",
                f"train.run_dir={run}",
                "train.batch_size=2",
                "train.max_steps=3",
                "train.warmup_steps=1",
                "train.log_every=1",
            ],
        )

    summary = train(cfg(tmp_path / "full"), progress=False)
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["loss"]))
    train(cfg(tmp_path / "split"), progress=False, stop_at=1)
    train(cfg(tmp_path / "split"), progress=False)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "split")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = (load_file(latest_checkpoint(tmp_path / d) / "model.safetensors") for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_auto_picks_dali_on_a_gpu_and_trains(tmp_path_factory):
    """The GPU path: auto -> DALI with NVDEC on H.264, batches already on the GPU, two training steps."""
    root = tmp_path_factory.mktemp("loader_gpu")
    make_synth(root / "videos", "mp4", count=4, seconds=10.0)
    prepare(scan_root(root / "videos"), root / "prepared", sample_rate=SR, min_seconds=2.0, progress=False)
    manifest = root / "prepared" / "manifest.jsonl"
    cfg = load_config(
        "tiny",
        overrides=[
            f"data.manifest={manifest}",
            f"train.run_dir={root / 'run'}",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.warmup_steps=1",
        ],
    )
    assert select_loader("auto", "cuda") == "dali"
    batch = next(iter(build_loader(manifest, cfg.data, 2, train=True, device=torch.device("cuda", 0))))
    assert batch["video"].is_cuda and batch["audio"].is_cuda
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))


def test_dali_video_only_batches_hold_no_audio_and_the_same_video(webm):
    from avmt.data.loader_dali import DALILoader

    both = list(DALILoader(webm, TEST_CFG, B, train=False, device_id=None))
    video = list(DALILoader(webm, TEST_CFG, B, train=False, device_id=None, modalities=("video",)))
    assert all("audio" not in b for b in video) and len(video) == len(both)
    assert all(torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"]) for a, b in zip(both, video))
    with pytest.raises(ValueError, match="for audio alone use the CPU loader"):
        DALILoader(webm, TEST_CFG, B, train=False, device_id=None, modalities=("audio",))
