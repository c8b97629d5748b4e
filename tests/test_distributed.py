"""Data-parallel training: two gloo processes on CPU, each on its half of a global batch, must produce the
gradients (and the steps) of one process on the whole batch, with DDP and with FSDP2 (parameters, gradients
and AdamW state sharded); and torchrun runs the trainer end to end (FSDP: and resumes from its shards)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Shard

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


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
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
    T.exit_without_shutdown()   # a worker that succeeded


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


def _tiny_model_and_text(root: Path) -> list[str]:
    """A saved 2-layer Llama with a byte tokenizer and text files under root; the trainer's arguments."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_train import _byte_tokenizer, _synthetic_text
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = _byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text").mkdir()
    for i, doc in enumerate(_synthetic_text(20, seed=4)):
        (root / "text" / f"{i}.txt").write_text(doc)
    return ["--model", str(root / "model"), "--text", str(root / "text"), "--layer", "0", "--k", "4", "--budget",
            "8", "--tokens", "384", "--batch", "64", "--context", "16", "--buffer", "96", "--harvest-contexts", "2",
            "--device", "cpu", "--threads", "1", "--no-plot", "--quiet"]


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "mxd_fast.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_two_ranks_end_to_end(tmp_path):
    args = _tiny_model_and_text(tmp_path)
    out = tmp_path / "run"
    _torchrun([*args, "--eval-tokens", "32", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["tokens"] == 384 and metrics["parallel"] == "ddp"
    assert all(Path(out / f"checkpoint-rank{r}.pt").exists() for r in range(WORLD))
    assert T.load_layer(out).n_experts == metrics["size"]
    # the logged loss and l0 are the whole batch's, as one process logs them (not divided by the ranks; the
    # ranks read other documents than one process does, so the losses agree only roughly)
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "mxd_fast.train", *args, "--eval-tokens", "32", "--out", str(single)],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks, one = (json.loads((o / "history.json").read_text()) for o in (out, single))
    assert [h["step"] for h in ranks] == [h["step"] for h in one]
    for a, b in zip(ranks, one):
        assert a["l0"] == pytest.approx(b["l0"], rel=0.05) and a["l0"] > 3
        assert a["loss"] == pytest.approx(b["loss"], rel=0.2) and a["nmse"] == pytest.approx(b["nmse"], rel=0.2)
    # --time-limit: the ranks agree on the step to stop at (a rank that stopped alone would hang the other)
    _torchrun([*args, "--eval-tokens", "0", "--log-every", "2", "--time-limit", "1e-9", "--out", str(tmp_path / "t")])
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["time_limited"] and metrics["tokens"] == 2 * 64


def test_torchrun_fsdp_end_to_end_and_resume(tmp_path):
    """--parallel fsdp --dtype bf16: the saved layer is gathered from the shards (activation scales folded in)
    and loads with load_layer; a run stopped after 3 of 6 steps and resumed from the per-rank shards equals
    the uninterrupted run."""
    load_file = pytest.importorskip("safetensors.torch").load_file
    args = [*_tiny_model_and_text(tmp_path), "--parallel", "fsdp", "--dtype", "bf16", "--normalize", "scalar",
            "--eval-tokens", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun([*args, "--out", str(full)])
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["tokens"] == 384 and metrics["parallel"] == "fsdp"
    layer = T.load_layer(full)
    assert layer.n_experts == metrics["size"] and torch.isfinite(layer(torch.randn(3, 32))).all()
    shards = [torch.load(full / f"checkpoint-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(s["fsdp"] and s["world"] == WORLD for s in shards)
    rows = [s["layer"]["experts"].shape[0] for s in shards]   # each rank holds its own rows only
    assert sum(rows) == metrics["size"] and max(rows) < metrics["size"]
    _torchrun([*args, "--out", str(part), "--stop-after", "3"])
    assert not (part / "layer.safetensors").exists()
    _torchrun([*args, "--out", str(part), "--resume"])
    a, b = load_file(str(full / "layer.safetensors")), load_file(str(part / "layer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((part / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


# ---- FSDP ------------------------------------------------------------------------------------

FSDP_STEPS = 2


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = _batch()[0].shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        results = {}
        for arch, dtype in [(arch, torch.float32) for arch in ARCHS] + [("mxd", torch.bfloat16)]:
            layer = _layer(arch)
            forward = T.wrap_for_ranks(T.TrainForward(layer, dtype), "fsdp", torch.device("cpu"))
            sharding = {n: (tuple(p.placements), tuple(p.to_local().shape)) for n, p in layer.named_parameters()}
            optimizer, scheduler = T.make_optimizer(layer, 1e-2, warmup=1)
            steps = []
            for i in range(FSDP_STEPS):
                x, y = _batch(1 + i)
                loss, *_ = T.train_step(forward, layer, optimizer, scheduler, x[rows], y[rows])
                steps.append({"grads": {n: _full(p.grad) for n, p in layer.named_parameters()},
                              "params": {n: _full(p).detach() for n, p in layer.named_parameters()}})
            # a per-rank checkpoint of the shards restores layer and AdamW state: the next step is the same
            path = os.path.join(out_dir, f"ckpt-{arch}-{rank}.pt")
            torch.save(T.local_state(layer, optimizer), path)
            layer2 = _layer(arch)
            forward2 = T.wrap_for_ranks(T.TrainForward(layer2, dtype), "fsdp", torch.device("cpu"))
            optimizer2, scheduler2 = T.make_optimizer(layer2, 1e-2, warmup=1)
            T.load_local_state(layer2, optimizer2, *torch.load(path, weights_only=False))
            scheduler2.load_state_dict(scheduler.state_dict())
            x, y = _batch(99)
            T.train_step(forward, layer, optimizer, scheduler, x[rows], y[rows])
            T.train_step(forward2, layer2, optimizer2, scheduler2, x[rows], y[rows])
            resumed_equal = all(torch.equal(a.to_local(), b.to_local())
                                for a, b in zip(layer.parameters(), layer2.parameters()))
            full = T.full_layer(layer, "cpu")
            results[(arch, str(dtype))] = {
                "steps": steps, "sharding": sharding, "resumed_equal": resumed_equal,
                "full": None if full is None else {n: t.clone() for n, t in full.state_dict().items()},
                "last": {n: _full(p).detach() for n, p in layer.named_parameters()}}
        torch.save(results, os.path.join(out_dir, f"fsdp-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    T.exit_without_shutdown()   # a worker that succeeded


def _reference_steps(arch: str, dtype: torch.dtype):
    """One process: FSDP_STEPS steps on the whole batch (fp32). With bf16 compute, each rank's half is
    computed in bf16 and the two gradients are averaged in fp32: what the ranks do before the update."""
    layer = _layer(arch)
    optimizer, scheduler = T.make_optimizer(layer, 1e-2, warmup=1)
    steps = []
    for i in range(FSDP_STEPS):
        x, y = _batch(1 + i)
        if dtype == torch.float32:
            T.train_step(T.TrainForward(layer), layer, optimizer, scheduler, x, y)
        else:
            halves = []
            for rows in (slice(0, 9), slice(9, 18)):
                half = copy.deepcopy(layer)
                opt, _ = T.make_optimizer(half, 0.0, warmup=1)
                T.train_step(T.TrainForward(half, dtype), half, opt, None, x[rows], y[rows])
                halves.append({n: p.grad for n, p in half.named_parameters()})
            layer.normalize_experts()
            for n, p in layer.named_parameters():
                p.grad = (halves[0][n] + halves[1][n]) / 2
            optimizer.step()
            scheduler.step()
        steps.append({"grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
                      "params": {n: p.detach().clone() for n, p in layer.named_parameters()}})
    return steps


def test_fsdp_gradients_and_steps_equal_single_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fsdp-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for (arch, dtype), result in ranks[0].items():
        # every parameter sharded along dim 0: the 23 expert rows (latents) split 12 + 11, each row whole
        for name, (placements, _) in result["sharding"].items():
            assert placements == (Shard(0),), f"{arch} {name}"
        rows = "experts" if arch == "mxd" else "decoder"
        assert [ranks[r][(arch, dtype)]["sharding"][rows][1] for r in range(WORLD)] == [(12, 10), (11, 10)]
        reference = _reference_steps(arch, getattr(torch, dtype.split(".")[-1]))
        for r in range(WORLD):
            for i, (got, want) in enumerate(zip(ranks[r][(arch, dtype)]["steps"], reference)):
                for name in want["grads"]:
                    where = f"{arch} {dtype} rank {r} step {i + 1}"
                    assert got["params"][name].dtype == torch.float32, where
                    torch.testing.assert_close(got["grads"][name], want["grads"][name], rtol=1e-5, atol=1e-7,
                                               msg=f"{where} grad {name}")
                    torch.testing.assert_close(got["params"][name], want["params"][name], rtol=1e-5, atol=1e-6,
                                               msg=f"{where} {name}")
            assert ranks[r][(arch, dtype)]["resumed_equal"], f"{arch} {dtype} rank {r}"
        assert ranks[1][(arch, dtype)]["full"] is None
        # the gathered layer on rank 0 is the sharded one, whole
        for name, t in ranks[0][(arch, dtype)]["last"].items():
            assert torch.equal(result["full"][name], t), f"{arch} {dtype} {name}"
