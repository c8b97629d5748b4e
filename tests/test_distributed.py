"""Data-parallel training: two gloo processes on CPU, each on its half of a global batch, must produce the
gradients (and the step) of one process on the whole batch; and torchrun runs the trainer end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mxd_fast import train as T

WORLD = 2
ARCHS = ("mxd", "transcoder", "skip-transcoder")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _layer(arch: str):
    torch.manual_seed(0)
    layer = T.build_layer(arch, 12, 10, 3, 23, d_hidden=16, activation="gelu", glu=arch == "mxd")
    with torch.no_grad():  # away from the zero initialisation, so every parameter gets a gradient
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * 9, 12, generator=g), torch.randn(2 * 9, 10, generator=g)


def _step(layer, forward, x, y):
    optimizer, scheduler = T.make_optimizer(layer, 1e-2, warmup=1)
    loss, *_ = T.train_step(forward, layer, optimizer, scheduler, x, y)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    return float(loss), grads, params


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _batch()
        share = x.shape[0] // world
        results = {}
        for arch in ARCHS:
            layer = _layer(arch)
            ddp = torch.nn.parallel.DistributedDataParallel(T.TrainForward(layer))
            rows = slice(rank * share, (rank + 1) * share)
            results[arch] = _step(layer, ddp, x[rows], y[rows])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    x, y = _batch()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for arch in ARCHS:
        layer = _layer(arch)
        _, grads, params = _step(layer, T.TrainForward(layer), x, y)
        for r in range(WORLD):
            _, g, p = ranks[r][arch]
            for name in grads:
                torch.testing.assert_close(g[name], grads[name], rtol=1e-5, atol=1e-7, msg=f"{arch} grad {name}")
                torch.testing.assert_close(p[name], params[name], rtol=1e-5, atol=1e-6, msg=f"{arch} {name}")
        # ranks saw different data but hold the same weights after the step
        for name in params:
            assert torch.equal(ranks[0][arch][2][name], ranks[1][arch][2][name])


def test_torchrun_two_ranks_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_train import _byte_tokenizer, _synthetic_text
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = _byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text").mkdir()
    for i, doc in enumerate(_synthetic_text(20, seed=4)):
        (tmp_path / "text" / f"{i}.txt").write_text(doc)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "mxd_fast.train", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "text"),
           "--layer", "0", "--k", "4", "--budget", "8", "--tokens", "384", "--batch", "64", "--context", "16",
           "--buffer", "96", "--harvest-contexts", "2", "--eval-tokens", "32", "--device", "cpu", "--threads", "1",
           "--no-plot", "--quiet", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["tokens"] == 384
    assert all(Path(out / f"checkpoint-rank{r}.pt").exists() for r in range(WORLD))
    assert T.load_layer(out).n_experts == metrics["size"]
