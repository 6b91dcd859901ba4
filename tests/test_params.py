import json
import subprocess
import sys

import pytest

from avmt.config import load_config
from avmt.models import AVBert
from avmt.params import count_parts, scheme_report, training_state_bytes

PAPER_TRANSFORMER = {"none": 127_581_696, "layers": 21_263_616, "all": 7_087_872, "lowrank": 3_843_840}


def expected_transformer_params(d: int, ffn: int, layers: int, transformers: int, sharing: str, rank: int) -> int:
    """Independent count from docs/method.md §2: dense maps + biases + 2 LayerNorms per distinct layer."""
    maps = [(d, d)] * 4 + [(d, ffn), (ffn, d)]  # Q, K, V, attention output, FFN in, FFN out
    norms = 2 * 2 * d
    if sharing == "lowrank":
        g, o = transformers, rank
        return sum(m * o + m + g * (n * o + o * o) for n, m in maps) + norms
    per_layer = sum(n * m + m for n, m in maps) + norms
    distinct = {"none": transformers * layers, "layers": transformers, "all": 1}[sharing]
    return distinct * per_layer


@pytest.mark.parametrize("scheme", list(PAPER_TRANSFORMER))
def test_paper_counts_are_exact(scheme):
    report = scheme_report(load_config("paper"), scheme)
    assert report["transformer_params"] == PAPER_TRANSFORMER[scheme]
    parts = ("transformer", "cnn", "projection", "embedding")
    assert report["total_params"] == sum(report[f"{p}_params"] for p in parts)


VALID = [
    (f, n, s)
    for f, n in [("mid", 3), ("late", 2), ("early", 1)]
    for s in PAPER_TRANSFORMER
    if not (f == "early" and s in ("all", "lowrank"))
]  # early fusion rejects cross-Transformer sharing


@pytest.mark.parametrize("fusion, transformers, scheme", VALID)
@pytest.mark.parametrize("d, heads, ffn, layers, rank", [(48, 4, 80, 3, 8), (64, 2, 96, 1, 5), (36, 3, 36, 4, 36)])
def test_counts_follow_d_o_l_g(fusion, transformers, scheme, d, heads, ffn, layers, rank):
    cfg = load_config(
        "tiny",
        overrides=[
            f"model.dim={d}",
            f"model.heads={heads}",
            f"model.ffn_dim={ffn}",
            f"model.layers={layers}",
            f"model.rank={rank}",
            f"model.fusion={fusion}",
            f"model.sharing={scheme}",
        ],
    )
    got = scheme_report(cfg, scheme)["transformer_params"]
    assert got == expected_transformer_params(d, ffn, layers, transformers, scheme, rank)


def test_parts_cover_every_parameter_once():
    model = AVBert(load_config("tiny").model)
    counts = count_parts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == sum(p.numel() for p in model.embeddings.parameters()) + 2 * model.cfg.dim


def test_training_state_bytes():
    assert training_state_bytes(10, amsgrad=True) == 10 * 4 * 5
    assert training_state_bytes(10, amsgrad=False) == 10 * 4 * 4


def test_params_cli_json_prints_the_four_numbers():
    out = subprocess.run([sys.executable, "-m", "avmt.params", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert {k: v["transformer_params"] for k, v in data.items()} == PAPER_TRANSFORMER
    assert all(v["total_params"] > v["transformer_params"] for v in data.values())


def test_params_cli_rejects_bad_config():
    proc = subprocess.run([sys.executable, "-m", "avmt.params", "model.rank=zero"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.rank='zero' is invalid: expected an integer" in proc.stderr
