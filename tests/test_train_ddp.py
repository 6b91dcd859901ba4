"""DDP as python -m avmt.train runs it (gloo, 2 processes on the CPU): one gradient all-reduce per optimizer step,
every parameter with a gradient in every step (so no find_unused_parameters), the same weights as all-reducing every
micro-batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from avmt.config import load_config

CONFIGS = (
    [],
    ["model.sharing=lowrank"],
    ["model.fusion=late"],
    ["model.fusion=early", "model.sharing=none"],
    ["objective.cpp_input=unimodal"],
    ["objective.mep_multimodal=0", "objective.cpp=0"],
    ["train.clips_with_grad=1"],
    ["train.cnn_checkpoint=true", "train.cnn_chunk=2"],
    ["objective.sampling_space=embeddings"],
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(cfg, n: int, rank: int, batch: int = 2):
    d = cfg.data
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(n):
        video = torch.randint(0, 256, (batch, d.num_clips, 3, d.frames, d.crop_size, d.crop_size), dtype=torch.uint8, generator=g)
        yield {"video": video, "audio": torch.randn(batch, d.num_clips, 1, d.n_mels, d.mel_frames, generator=g)}


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _build(overrides: list[str]):
    """(config, model + heads, its DDP wrapper as train makes it, optimizer, schedule) of the tiny preset."""
    from avmt.models import AVBert
    from avmt.objectives import Pretraining
    from avmt.optim import build_optimizer, build_scheduler

    cfg = load_config("tiny", overrides=["train.warmup_steps=1", *overrides])
    torch.manual_seed(0)
    pre = Pretraining(AVBert(cfg.model).set_memory_options(cfg.train), cfg.objective)
    net = DistributedDataParallel(pre, find_unused_parameters=False, gradient_as_bucket_view=True)
    opt = build_optimizer(pre.parameters(), cfg.train)
    return cfg, pre, net, opt, build_scheduler(opt, cfg.train)


def _step(cfg, pre, net, opt, sched, gen, rank: int, step: int):
    from avmt.train import training_step

    batches = _batches(cfg, cfg.train.grad_accum, rank * 10 + step)
    return training_step(net, pre, batches, opt, sched, cfg.train, torch.device("cpu"), False, gen)


def _every_parameter_has_a_gradient(rank, port, out):
    """Each config, 3 steps of batch 2 per rank: a backward that left a parameter without a gradient fails DDP
    (find_unused_parameters is off), which the step reports as an exception."""
    _init(rank, port)
    failures = []
    for overrides in CONFIGS:
        cfg, pre, net, opt, sched = _build(overrides)
        gen = torch.Generator().manual_seed(rank)
        try:
            for step in range(3):
                got = _step(cfg, pre, net, opt, sched, gen, rank, step)
                assert got.outcome == "ok", got.outcome
        except Exception as e:  # reported to the test, which names the config
            failures.append(f"{overrides}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    out[rank] = failures
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_every_parameter_gets_a_gradient_in_every_step_without_find_unused_parameters():
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_every_parameter_has_a_gradient, args=(_port(), out), nprocs=2, join=True)
    assert out[0] == [] and out[1] == [], dict(out)


def _allreduced_bytes(rank, port, grad_accum, old_way, out):
    """Bytes the DDP communication hook all-reduces per optimizer step, and the weights after 2 steps."""
    import contextlib

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    _init(rank, port)
    cfg, pre, net, opt, sched = _build([f"train.grad_accum={grad_accum}"])
    sent = []

    def counting(state, bucket):
        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(state, bucket)

    net.register_comm_hook(dist.group.WORLD, counting)
    if old_way:  # every micro-batch's backward all-reduces, as before no_sync
        net.no_sync = contextlib.nullcontext
    gen = torch.Generator().manual_seed(rank)
    per_step = []
    for step in range(2):
        sent.clear()
        assert _step(cfg, pre, net, opt, sched, gen, rank, step).outcome == "ok"
        per_step.append(sum(sent))
    grad_bytes = sum(p.numel() * p.element_size() for p in pre.parameters() if p.requires_grad)
    out[(rank, grad_accum, old_way)] = (per_step, grad_bytes, [p.detach().clone() for p in pre.parameters()])
    dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("grad_accum", [1, 4])
def test_one_gradient_all_reduce_per_optimizer_step(grad_accum):
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    for old_way in (False, True):
        mp.spawn(_allreduced_bytes, args=(_port(), grad_accum, old_way, out), nprocs=2, join=True)
    per_step, grad_bytes, weights = out[(0, grad_accum, False)]
    assert per_step == [grad_bytes, grad_bytes]  # the gradients once, whatever grad_accum
    old_per_step, _, old_weights = out[(0, grad_accum, True)]
    assert old_per_step == [grad_accum * grad_bytes] * 2  # what it sent before
    # the same weights: the sum of the micro-batches' gradients is all-reduced once instead of each one, so only the
    # order of the additions differs (exactly equal for grad_accum 1); AdamW's division by sqrt(v) magnifies that in the
    # few weights whose second moment is tiny (3e-5 relative after 2 steps, seen)
    for new, old in zip(weights, old_weights):
        if grad_accum == 1:
            assert torch.equal(new, old)
        else:
            torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    assert [w.tolist() for w in out[(1, grad_accum, False)][2]] == [w.tolist() for w in weights]  # the ranks agree


# The training command under torchrun, with a record of what each rank did: its rank and world size, and the manifest
# rows its loader gave it.
WRAPPER = """
import json, os, sys
import torch.distributed as dist
import avmt.data.loader_cpu as lc
import avmt.train as tr

out = os.environ["AVMT_TEST_OUT"]
real_iterate = lc.CPULoader.iterate

def iterate(self, start_batch=0):
    for batch in real_iterate(self, start_batch):
        with open(os.path.join(out, f"rows-{dist.get_rank()}-of-{dist.get_world_size()}.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "rows": batch["index"].tolist()}) + "\\n")
        yield batch

lc.CPULoader.iterate = iterate
sys.exit(tr.main(sys.argv[1:]))
"""


def _torchrun(tmp_path, manifest, run_dir, *launcher, env=None, steps=3):
    import subprocess
    import sys

    tmp_path.mkdir(parents=True, exist_ok=True)
    script, out = tmp_path / "wrapper.py", run_dir.parent / f"{run_dir.name}-ranks"
    script.write_text(WRAPPER)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), "--preset", "tiny", f"data.manifest={manifest}"]
    cmd += ["data.num_workers=0", f"train.run_dir={run_dir}", "train.batch_size=2", f"train.max_steps={steps}", "train.save_every=2"]
    cmd += ["train.warmup_steps=1", "train.dist_timeout_s=60", "--quiet"]
    environ = os.environ | {"OMP_NUM_THREADS": "1", "AVMT_TEST_OUT": str(out)} | (env or {})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ), out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from avmt.train import synthetic_manifest

    os.environ["AVMT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return synthetic_manifest(load_config("tiny").data, count=12, progress=False)


@pytest.mark.timeout(300)
def test_two_nodes_train_with_disjoint_complete_shards_and_rank_0_alone_writing(manifest, tmp_path):
    """Two torchrun agents on this machine as two nodes (c10d rendezvous, gloo, one process each), 3 steps of batch 2:
    one epoch of the 12 videos."""
    import json

    port = _port()
    run = tmp_path / "run"
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    nodes = [_torchrun(tmp_path / f"node{k}", manifest, run, *launcher, "--rdzv-id", "avmt-test") for k in range(2)]
    results = [(p.communicate(timeout=240), p.returncode) for p, _ in nodes]
    for (_, stderr), code in results:
        assert code == 0, stderr[-3000:]
    assert sum(stdout.count("summary:") for (stdout, _), _ in results) == 1  # rank 0 alone prints it
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step_000002", "step_000003"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # one record per step, from rank 0
    out = nodes[0][1]
    files = sorted(f.name for f in out.iterdir())
    assert files == ["rows-0-of-2.jsonl", "rows-1-of-2.jsonl"], files
    rows = {f: [r for line in (out / f).read_text().splitlines() for r in json.loads(line)["rows"]] for f in files}
    assert all(len(r) == 6 for r in rows.values())  # 3 batches of 2 each
    assert set(rows[files[0]]).isdisjoint(rows[files[1]]) and set(rows[files[0]]) | set(rows[files[1]]) == set(range(12))
