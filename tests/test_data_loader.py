"""data.loader = auto | cpu | dali (avmt.data.loader): the choice and its errors before any work."""

import pytest
import torch
from data_fixtures import SR, make_synth

from avmt.config import ConfigError, load_config
from avmt.data.loader import Loader, LoaderError, build_loader, loader_status, select_loader
from avmt.data.loader_cpu import CPULoader
from avmt.data.prepare import prepare, scan_root
from avmt.train import TrainingError, train


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
    built = build_loader(webm, cfg, 2, train=True, device="cpu")
    assert isinstance(built, CPULoader) and isinstance(built, Loader)  # the interface the trainer relies on
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
    cfg = load_config(
        "tiny", overrides=["data.loader=dali", f"train.run_dir={tmp_path / 'run'}", f"data.manifest={tmp_path / 'never-read.jsonl'}"]
    )
    with pytest.raises(TrainingError, match=r"data.loader='dali' cannot run here: nvidia.dali does not import"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
