import dataclasses

import pytest

from avmt.config import PRESETS, ConfigError, DataConfig, ModelConfig, load_config


def test_paper_preset_is_the_spec():
    cfg = load_config("paper")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.dim, m.layers, m.heads, m.ffn_dim, m.rank) == (768, 6, 12, 3072, 128)
    assert (m.dropout, m.ln_eps, m.fusion) == (0.1, 1e-12, "mid")
    assert (m.visual_width, m.visual_depths, m.visual_temporal_kernels) == (64, (3, 4, 6, 3), (1, 1, 3, 3))
    assert (m.audio_width, m.audio_depths, m.audio_separable_stages) == (32, (3, 4, 6, 3), 2)
    assert m.max_clips >= 64  # beyond the paper's 30 s
    assert (d.num_clips, d.frames, d.fps, d.crop_size, d.window_seconds) == (15, 32, 16.0, 112, 30.0)
    assert d.num_clips * d.frames == 480
    assert (d.sample_rate, d.n_mels, d.mel_frames) == (44100, 80, 128)
    assert (t.betas, t.weight_decay, t.amsgrad) == ((0.9, 0.98), 1e-4, True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_yaml(tmp_path, name):
    cfg = load_config(name)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path=path) == cfg


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmodel:\n  sharing: layers\n  dim: 32\ntrain:\n  lr: 2e-3\n")
    cfg = load_config(path=path, overrides=["model.sharing=all", "train.betas=[0.8, 0.9]", "data.num_clips=3"])
    assert cfg.preset == "tiny"
    assert cfg.model.sharing == "all"  # the command line wins over the file
    assert cfg.model.dim == 32 and cfg.model.heads == PRESETS["tiny"].model.heads
    assert cfg.train.lr == 2e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 2e-3 as a string
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.data.num_clips == 3
    # an explicit preset wins over the file's
    assert load_config("small", path).model.ffn_dim == PRESETS["small"].model.ffn_dim


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.sharng=none", ["model.sharng", "did you mean 'sharing'"]),
        ("modle.dim=8", ["modle", "did you mean 'model'"]),
        ("model.sharing=shared", ["model.sharing='shared'", "'none', 'layers', 'all', 'lowrank'"]),
        ("model.fusion=deep", ["model.fusion='deep'", "'early', 'mid', 'late'"]),
        ("model.dim=abc", ["model.dim='abc'", "an integer"]),
        ("model.dim=12.5", ["model.dim=12.5", "an integer"]),
        ("model.dim=-4", ["model.dim=-4", "> 0"]),
        ("model.dropout=1.5", ["model.dropout=1.5", "[0, 1)"]),
        ("model.zero_init_residual=maybe", ["model.zero_init_residual='maybe'", "true or false"]),
        ("model.heads=5", ["model.heads=5", "divisor of model.dim=768"]),
        ("model.visual_depths=[3,4]", ["model.visual_temporal_kernels", "one odd kernel size per stage"]),
        ("data.num_clips=80", ["data.num_clips=80", "window_seconds / clip_seconds"]),
        ("train.betas=[0.9]", ["train.betas", "two numbers in [0, 1)"]),
        ("model.dim", ["section.key=value"]),
        ("dim=8", ["section.key"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config("paper", overrides=[override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_cross_section_and_fusion_rules():
    with pytest.raises(ConfigError, match=r"data.num_clips=16 .*model.max_clips=8"):
        load_config("paper", overrides=["model.max_clips=8", "data.num_clips=16", "data.window_seconds=40"])
    for sharing in ("all", "lowrank"):
        with pytest.raises(ConfigError, match="early fusion has a single Transformer"):
            load_config("paper", overrides=["model.fusion=early", f"model.sharing={sharing}"])
    for sharing in ("none", "layers"):
        assert load_config("paper", overrides=["model.fusion=early", f"model.sharing={sharing}"]).model.fusion == "early"


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path=tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path=tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: {dim: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="preset='huge'"):
        load_config("huge")


def test_sections_validate_on_construction_and_are_frozen():
    with pytest.raises(ConfigError, match="model.rank=0"):
        ModelConfig(rank=0)
    with pytest.raises(ConfigError, match="data.crop_size=200"):
        DataConfig(crop_size=200)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["paper"].model.dim = 1  # type: ignore[misc]


def test_objective_section():
    cfg = load_config("paper", overrides=["objective.negatives=64", "objective.sampling=uniform"])
    assert (cfg.objective.negatives, cfg.objective.sampling, cfg.objective.mask_ratio) == (64, "uniform", 0.15)
    with pytest.raises(ConfigError, match="objective.mask_random=0.1 is invalid: expected at most 1 - objective.mask_token = 0.05"):
        load_config("paper", overrides=["objective.mask_token=0.95"])
    with pytest.raises(ConfigError, match="objective.sampling='nearest'"):
        load_config("paper", overrides=["objective.sampling=nearest"])
    with pytest.raises(ConfigError, match="objective.cpp_input='multimodal' is invalid with model.fusion='late'"):
        load_config("paper", overrides=["model.fusion=late", "objective.cpp_input=multimodal"])
    with pytest.raises(ConfigError, match="objective.cpp_input='unimodal' is invalid with model.fusion='early'"):
        load_config("paper", overrides=["model.fusion=early", "model.sharing=none", "objective.cpp_input=unimodal"])
