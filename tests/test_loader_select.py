"""data.loader = auto | cpu | dali: the choice, its errors, and the training loop on the DALI loader."""

import gc
import json

import pytest
import torch
from data_fixtures import SR, make_synth
from safetensors.torch import load_file

from avmt.checkpoint import latest_checkpoint
from avmt.config import ConfigError, load_config
from avmt.data.loader import LoaderError, build_loader, loader_status, select_loader
from avmt.data.loader_cpu import CPULoader
from avmt.data.prepare import load_manifest, prepare, scan_root
from avmt.train import TrainingError, train


@pytest.fixture(autouse=True)
def free_dali_pipelines():
    """Collect each test's DALI loaders (reference cycles) so that their prefetching threads are gone before a
    later test forks worker processes (a fork while such a thread holds a lock can deadlock the child)."""
    yield
    gc.collect()


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def webm(tmp_path_factory):
    """Four 10 s VP9/webm videos with sound, prepared (DALI's CPU decoder reads VP9, not H.264)."""
    root = tmp_path_factory.mktemp("loader_select")
    make_synth(root / "videos", "webm", count=4, seconds=10.0)
    s = prepare(scan_root(root / "videos"), root / "prepared", sample_rate=SR, min_seconds=2.0, progress=False)
    assert s.kept == 4, s
    return root / "prepared" / "manifest.jsonl"


def test_auto_picks_the_cpu_loader_without_cuda_and_bad_choices_fail(webm):
    cfg = load_config("tiny").data
    assert cfg.loader == "auto"
    assert select_loader("auto", "cpu") == "cpu" and select_loader("cpu", "cpu") == "cpu"
    assert isinstance(build_loader(webm, cfg, 2, train=True, device="cpu"), CPULoader)
    status = loader_status("cpu")
    assert status["cpu"][0] and all(why for _, why in status.values())
    if not torch.cuda.is_available():
        assert select_loader("auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ConfigError, match=r"data.loader='nvdec' is invalid: expected one of 'auto', 'cpu', 'dali'"):
        load_config("tiny", overrides=["data.loader=nvdec"])
    with pytest.raises(LoaderError, match="invalid"):
        select_loader("fast", "cpu")


def test_forcing_dali_where_it_cannot_run_fails_before_any_work(tmp_path, monkeypatch):
    import avmt.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "_dali_import_error", lambda: "nvidia.dali does not import (test)")
    cfg = load_config("tiny", overrides=["data.loader=dali", f"train.run_dir={tmp_path / 'run'}",
                                         f"data.manifest={tmp_path / 'never-read.jsonl'}"])
    with pytest.raises(TrainingError, match=r"data.loader='dali' cannot run here: nvidia.dali does not import"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not dali_installed(), reason="needs nvidia-dali")
def test_dali_on_a_cpu_refuses_h264_before_any_work(webm, tmp_path):
    mp4 = tmp_path / "manifest.jsonl"  # the same rows, declared H.264: DALI's CPU decoder cannot read them
    mp4.write_text("".join(json.dumps(dict(r, video_codec="h264")) + "\n" for r in load_manifest(webm)))
    cfg = load_config("tiny", overrides=["data.loader=dali", f"data.manifest={mp4}", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match=r"only vp9, mjpeg: 4 of 4 videos are h264 .*data.loader=cpu"):
        train(cfg, progress=False, stop_at=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not dali_installed(), reason="needs nvidia-dali")
def test_training_on_dali_cpu_pipeline_runs_and_resumes_exactly(webm, tmp_path):
    """Three steps of batch 2 over 4 videos cross an epoch boundary; stopping after step 1 and resuming gives
    the same losses and weights (DALI's iterate(k) resumes mid-epoch like the CPU loader)."""
    def cfg(run):
        return load_config("tiny", overrides=["data.loader=dali", f"data.manifest={webm}", "data.num_workers=1",
                                              f"train.run_dir={run}", "train.batch_size=2", "train.max_steps=3",
                                              "train.warmup_steps=1", "train.log_every=1"])

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
    cfg = load_config("tiny", overrides=[f"data.manifest={manifest}", f"train.run_dir={root / 'run'}", "train.batch_size=2",
                                         "train.max_steps=2", "train.warmup_steps=1"])
    assert select_loader("auto", "cuda") == "dali"
    batch = next(iter(build_loader(manifest, cfg.data, 2, train=True, device=torch.device("cuda", 0))))
    assert batch["video"].is_cuda and batch["audio"].is_cuda
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))
