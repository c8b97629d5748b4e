"""The trainer on a tiny randomly initialised Llama (no network, no large model): harvesting hooks,
splicing, the loss, the statistics, saving and loading, atomic checkpoints, resuming, and a short
end-to-end run of `python -m mxd_fast.train`."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

from mxd_fast import MxD, TopKTranscoder, mxd_experts_for_budget  # noqa: E402
from mxd_fast import harvest as H  # noqa: E402
from mxd_fast import train as T  # noqa: E402
from mxd_fast.train import checkpoint, cli, layer_io, stats  # noqa: E402
from mxd_fast.train import data as D  # noqa: E402
from mxd_fast.evaluate import SplicedMLP, ZeroMLP, cross_entropy, evaluate, splice_layer, spliced  # noqa: E402

WORDS = ("the a model layer expert token sparse dense matrix vector gate decoder encoder python function "
         "returns value list of and to in is for with that by on").split()


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _synthetic_text(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 2-layer Llama (d = 32, MLP width 64, SwiGLU) with a byte-level tokenizer, and text files."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tokenizer = _byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text_dir = root / "text"
    text_dir.mkdir()
    for i, doc in enumerate(_synthetic_text(40, seed=1)):
        (text_dir / f"doc{i:02d}.txt").write_text(doc)
    with open(root / "extra.jsonl", "w") as fh:
        for doc in _synthetic_text(5, seed=2):
            fh.write(json.dumps({"text": doc}) + "\n")
    loaded, tok = H.load_model(str(model_dir))
    return {"dir": str(model_dir), "text": str(text_dir), "jsonl": str(root / "extra.jsonl"), "model": loaded,
            "tokenizer": tok}


# ---- harvesting ------------------------------------------------------------------------------

def test_harvest_records_mlp_input_and_output_and_stops_early(tiny):
    model = tiny["model"]
    ids = torch.randint(0, 200, (3, 16))
    block = model.model.layers[0]
    seen = {}
    h1 = block.mlp.register_forward_hook(lambda m, a, o: seen.update(x=a[0].clone(), y=o.clone()))
    calls = []
    h2 = model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            model(input_ids=ids)
        calls.clear()
        with H.Harvester(model, 0) as harvester:
            x, y = harvester.harvest(ids)
    finally:
        h1.remove()
        h2.remove()
    assert calls == []  # the forward pass stopped after the MLP of layer 0
    assert x.shape == (48, 32) and y.shape == (48, 32)
    torch.testing.assert_close(x, seen["x"].reshape(-1, 32), rtol=0, atol=0)
    torch.testing.assert_close(y, seen["y"].reshape(-1, 32), rtol=0, atol=0)
    # the input is after the block's pre-MLP norm: the MLP maps it to y
    torch.testing.assert_close(block.mlp(x), y, rtol=1e-5, atol=1e-6)
    assert len(block.mlp._forward_hooks) == 0  # the harvester removed its hook


def test_model_dims_and_find_mlp(tiny):
    dims = H.model_dims(tiny["model"], 1)
    assert dims == {"d": 32, "hidden": 64, "activation": "silu", "model_activation": "silu", "activation_refusal": None,
                    "glu": True}
    with pytest.raises(ValueError, match="layers"):
        H.find_mlp(tiny["model"], 5)


def test_text_loading_split_and_stream(tiny):
    docs = H.read_documents([tiny["text"], tiny["jsonl"]])
    assert len(docs) == 45
    train, held = H.split_documents(docs, 0.2)
    assert len(train) + len(held) == 45 and held
    assert H.split_documents(list(reversed(docs)), 0.2)[1] == list(reversed(held))
    tok = tiny["tokenizer"]
    a, b = (H.TokenStream(train, tok, 16, seed=3, rank=r, world=2) for r in (0, 1))
    assert set(a._order).isdisjoint(b._order) and len(a._order) + len(b._order) == len(train)
    s = H.TokenStream(train, tok, 16, seed=3)
    s.next_contexts(5)
    state = s.state_dict()
    want = s.next_contexts(7)
    s2 = H.TokenStream(train, tok, 16, seed=3)
    s2.load_state_dict(state)
    assert torch.equal(s2.next_contexts(7), want)
    # passes over the corpus repeat with a new order
    s3 = H.TokenStream(docs[:2], tok, 16, seed=0)
    assert s3.next_contexts(40).shape == (40, 16) and s3.epoch > 0


def test_jsonl_without_text_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text"):
        H.read_documents([str(bad)])


def test_buffer_shuffles_refills_and_resumes(tiny):
    docs = H.read_documents([tiny["text"]])
    stream_args = (docs, tiny["tokenizer"], 8)
    counter = {"n": 0}

    def fake_harvest(ids):  # rows carry their token ids, so that order can be checked
        counter["n"] += 1
        x = ids.reshape(-1, 1).float().repeat(1, 3)
        return x, -x

    def make():
        return H.ActivationBuffer(fake_harvest, H.TokenStream(*stream_args, seed=1), capacity=64,
                                  contexts_per_harvest=2, seed=5)

    buf = make()
    batches = [buf.next_batch(10) for _ in range(5)]
    assert all(torch.equal(y, -x) for x, y in batches)
    state = buf.state_dict()
    want = [buf.next_batch(10) for _ in range(8)]
    again = make()
    again.load_state_dict(state)
    got = [again.next_batch(10) for _ in range(8)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(want, got))
    # shuffled: consecutive rows do not come from consecutive positions of one context
    first = batches[0][0][:, 0]
    assert not torch.equal(first, torch.sort(first).values)


# ---- splicing and evaluation -----------------------------------------------------------------

class _OwnMLP(torch.nn.Module):
    """Returns the MLP's own output: splicing it in must change nothing."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


class _HalvedOutput(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = [mlp]   # not registered: no parameters

    def forward(self, x):
        return 0.5 * self.mlp[0](x)


def test_splicing_the_mlp_itself_changes_nothing(tiny):
    model = tiny["model"]
    contexts = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    mlp = H.find_mlp(model, 1)[2]
    m = evaluate(model, _OwnMLP(mlp), 1, contexts, batch=3)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert abs(m["delta_ce"]) < 1e-6 and abs(m["kl_spliced"]) < 1e-6
    assert m["eval_nmse"] < 1e-10
    assert m["ce_zero_ablation"] != pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["eval_tokens"] == 4 * 15
    # the model is left as it was
    assert H.find_mlp(model, 1)[2] is mlp
    assert cross_entropy(model, contexts) == pytest.approx(m["ce_clean"], rel=1e-6)
    # a layer without parameters of its own (here: the MLP's output halved) runs on the model's device
    halved = evaluate(model, _HalvedOutput(mlp), 1, contexts, batch=3)
    assert halved["eval_nmse"] == pytest.approx(0.25, rel=1e-4)
    # KL(clean || spliced) per predicted token, against a direct computation
    with spliced(model, 1, _HalvedOutput(mlp)), torch.no_grad():
        q = torch.log_softmax(model(input_ids=contexts).logits[:, :-1].float(), -1)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=contexts).logits[:, :-1].float(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert halved["kl_spliced"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert m["kl_zero_ablation"] > 0


def test_splice_layer_is_permanent_and_reversible(tiny):
    model = tiny["model"]
    keys = list(model.state_dict())
    mlp = H.find_mlp(model, 1)[2]
    old = splice_layer(model, 1, MxD(32, 16, 32, 8, 2))
    assert old is mlp and isinstance(H.find_mlp(model, 1)[2], SplicedMLP)
    assert splice_layer(model, 1, old).layer.n_experts == 8
    assert H.find_mlp(model, 1)[2] is mlp and list(model.state_dict()) == keys   # restored exactly
    wrapped = nn.Sequential(MxD(32, 16, 32, 8, 2))   # any other module is wrapped too (dtype and shape casts)
    assert splice_layer(model, 1, wrapped) is mlp and H.find_mlp(model, 1)[2].layer is wrapped
    splice_layer(model, 1, mlp)
    assert H.find_mlp(model, 1)[2] is mlp and list(model.state_dict()) == keys
    for bad, error in (("foo", TypeError), (None, TypeError)):
        with pytest.raises(error, match="layer must be an nn.Module"):
            splice_layer(model, 1, bad)
    with pytest.raises(TypeError, match="layer index must be an int, got float"):
        splice_layer(model, 1.7, ZeroMLP())
    assert H.find_mlp(model, 1)[2] is mlp
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with spliced(model, 0, ZeroMLP()):
            zero = model(input_ids=ids).logits
        old = splice_layer(model, 0, ZeroMLP())
        try:
            torch.testing.assert_close(model(input_ids=ids).logits, zero)
        finally:
            splice_layer(model, 0, old)
        torch.testing.assert_close(model(input_ids=ids).logits, clean)
    assert not torch.allclose(clean, zero)


# ---- the recipe ------------------------------------------------------------------------------

def test_loss_divides_by_the_unsquared_norm():
    y = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    y_hat = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    # token 0: (9 + 16) / 5; token 1: (1 + 0) / 2; mean over 4 entries
    assert float(T.mxd_loss(y_hat, y)) == pytest.approx((25 / 5 + 1 / 2) / 4)
    assert torch.isfinite(T.mxd_loss(torch.ones(2, 3), torch.zeros(2, 3)))


def test_budget_sizes_match_and_equal_parameters():
    d, hidden, width = 24, 40, 24 * 8
    n = T.size_for_budget("mxd", width, d, hidden, d)
    assert n == mxd_experts_for_budget(d, hidden, d, width)
    budget = T.budget_parameters(d, d, width)
    assert budget == TopKTranscoder(d, width, d, 4).num_parameters()
    for arch, kwargs in (("mxd", {}), ("mxd", {"glu": True, "activation": "silu"}), ("transcoder", {}),
                         ("skip-transcoder", {})):
        size = T.size_for_budget(arch, width, d, hidden, d, k=4, **kwargs)
        layer = T.build_layer(arch, d, d, 4, size, d_hidden=hidden, **kwargs)
        assert budget - (2 * d + 1) < layer.num_parameters() <= budget, (arch, kwargs)
    with pytest.raises(ValueError, match="budget"):
        T.size_for_budget("mxd", d, d, 4 * d, d, k=4)


def test_firing_stats_from_indices():
    stats = T.FiringStats(6)
    values = torch.tensor([[3.0, 1.0], [2.0, 0.0], [5.0, 4.0]])
    indices = torch.tensor([[0, 2], [2, 5], [2, 3]])
    stats.update(values, indices)
    assert stats.window.tolist() == [1, 0, 3, 1, 0, 0]  # the zero value of expert 5 did not fire
    summary = stats.close_window(tokens_seen=3)
    assert summary["freq_max"] == pytest.approx(1.0) and summary["fired_in_window"] == pytest.approx(0.5)
    assert stats.dead_fraction(3, window=100) == pytest.approx(0.5)
    stats.update(torch.ones(1, 1), torch.tensor([[1]]))
    stats.close_window(tokens_seen=10)
    assert stats.dead_fraction(10, window=5) == pytest.approx(5 / 6)  # only expert 1 fired in tokens 5..10
    assert stats.dead_fraction(10, window=100) == pytest.approx(2 / 6)


def test_train_step_follows_the_recipe():
    torch.manual_seed(0)
    layer = MxD(8, 12, 8, 20, 3)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    with torch.no_grad():
        layer.experts.mul_(3.0)  # off the unit sphere: the step must renormalise first
    fwd = T.TrainForward(layer)
    opt, sched = T.make_optimizer(layer, 1e-3, warmup=4)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    seen = {}
    orig = layer.remove_parallel_gradient

    @torch.no_grad()
    def check():
        orig()
        seen["radial"] = float((layer.experts.grad * layer.experts).sum(1).abs().max())
        seen["norms"] = layer.experts.norm(dim=1)
    layer.remove_parallel_gradient = check
    loss, y_hat, values, indices = T.train_step(fwd, layer, opt, sched, x, y)
    assert seen["radial"] < 1e-6
    torch.testing.assert_close(seen["norms"], torch.ones(20))
    assert values.shape == indices.shape == (16, 3)
    for _ in range(3):
        T.train_step(fwd, layer, opt, sched, x, y)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # warm-up over, constant
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mixed_precision_keeps_fp32_master_weights(dtype):
    torch.manual_seed(0)
    layer = MxD(8, 12, 8, 20, 3, activation="silu", glu=True)
    with torch.no_grad():
        layer.decoder.normal_()
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    fwd = T.TrainForward(layer, dtype)
    y_hat, values, indices = fwd(x)
    assert y_hat.dtype == dtype
    T.mxd_loss(y_hat, y).backward()
    assert layer.decoder.dtype == torch.float32
    assert layer.decoder.grad is not None and layer.decoder.grad.dtype == torch.float32
    want = layer.decoder.grad.clone()
    layer.zero_grad()
    T.mxd_loss(T.TrainForward(layer)(x)[0], y).backward()
    tol = 1e-5 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(want, layer.decoder.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", T.ARCHS)
def test_fold_scales_is_exact(arch):
    torch.manual_seed(0)
    # float64: the fold is exact algebra, and float32 rounding of outputs near 1e5 would hide in atol
    layer = T.build_layer(arch, 10, 10, 3, 17, d_hidden=14, glu=arch == "mxd").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(9, 10, dtype=torch.float64)
    want = layer(x * 3.5) / 0.25
    folded = T.fold_scales(layer, 3.5, 0.25)
    torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-10)
    scales = T.activation_scales(torch.full((4, 9), 2.0), torch.full((4, 16), 0.5))
    assert scales == pytest.approx((1 / 2, 4 / 2))


# ---- files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,skip", [(arch, False) for arch in T.ARCHS] + [("mxd", True)])
def test_save_load_round_trip(tmp_path, arch, skip):
    torch.manual_seed(0)
    layer = T.build_layer(arch, 10, 10, 3, 17, d_hidden=14, activation="gelu_tanh", glu=arch == "mxd", skip=skip)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    T.save_layer(layer, tmp_path, {"note": 1})
    loaded = T.load_layer(tmp_path)
    assert type(loaded) is type(layer) and T.layer_spec(loaded) == T.layer_spec(layer)
    x = torch.randn(7, 10)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["note"] == 1
    assert T.load_layer(tmp_path / "layer.safetensors").k == 3
    for other in ("config.json", "layer_step100.safetensors"):
        (tmp_path / other).touch()
        with pytest.raises(ValueError, match=f"{other}: load_layer reads a run folder or its layer.safetensors"):
            T.load_layer(tmp_path / other)
    with pytest.raises(FileNotFoundError, match="no run folder"):
        T.load_layer(tmp_path / "missing")
    (tmp_path / "stopped").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder: it has no layer.safetensors .*--resume"):
        T.load_layer(tmp_path / "stopped")



def test_save_load_keeps_dtype_and_unwraps_compiled_layers(tmp_path):
    layer = T.build_layer("mxd", 10, 10, 3, 17, d_hidden=14).to(torch.bfloat16)
    T.save_layer(torch.compile(layer), tmp_path)           # the module inside torch.compile's wrapper
    loaded = T.load_layer(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.state_dict().keys() == layer.state_dict().keys()
    assert all(p.requires_grad for p in loaded.parameters())
    assert T.load_layer(tmp_path, dtype=torch.float32).experts.dtype == torch.float32

def test_save_and_load_refuse_bad_arguments_naming_them(tmp_path):
    with pytest.raises(TypeError, match="cannot describe a Linear"):
        T.save_layer(nn.Linear(3, 3), tmp_path / "linear")
    assert not (tmp_path / "linear").exists()   # nothing half-written
    T.save_layer(T.build_layer("transcoder", 6, 6, 2, 8), tmp_path / "run")
    for kwargs, error, message in [
        ({"dtype": "bf16"}, TypeError, "dtype must be a floating-point torch.dtype"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating-point torch.dtype"),
        ({"device": "meta"}, ValueError, "device: a meta tensor holds no data"),
        ({"device": "nodevice"}, ValueError, "device: 'nodevice' is not a device"),
    ] + ([({"device": "cuda"}, ValueError, "no CUDA device is available")] if not torch.cuda.is_available() else []):
        with pytest.raises(error, match=message):
            T.load_layer(tmp_path / "run", **kwargs)
    assert T.load_layer(tmp_path / "run", device="cpu:0", dtype=torch.float64).decoder.dtype == torch.float64
    config = tmp_path / "run" / "config.json"
    for text in ("{not json", '{"model": {}}', '{"layer": {"arch": "mlp"}}'):
        config.write_text(text)
        with pytest.raises(ValueError, match="config.json does not describe a layer"):
            T.load_layer(tmp_path / "run")


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.atomic_save({"v": 1}, path)

    def broken(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        T.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# ---- end to end ------------------------------------------------------------------------------

def _args(tiny, out, *extra):
    return ["--model", tiny["dir"], "--text", tiny["text"], "--layer", "1", "--k", "4", "--budget", "8",
            "--tokens", "960", "--batch", "48", "--context", "16", "--buffer", "200", "--harvest-contexts", "4",
            "--lr", "3e-3", "--warmup", "3", "--eval-tokens", "64", "--log-every", "5", "--out", str(out),
            "--quiet", "--no-plot", *extra]


def test_main_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    metrics = T.main(_args(tiny, out, "--arch", "mxd", "--normalize", "scalar"))
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("nmse", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablation", "delta_ce", "tokens",
                "tokens_per_s"):
        assert key in on_disk and on_disk[key] is not None and math.isfinite(on_disk[key]), key
    assert on_disk["tokens"] == 960 and metrics["l0"] <= 4
    assert on_disk["delta_ce"] == pytest.approx(on_disk["ce_spliced"] - on_disk["ce_clean"])
    history = json.loads((out / "history.json").read_text())
    assert history[0]["nmse"] > history[-1]["nmse"]  # it learns
    layer = T.load_layer(out)
    assert isinstance(layer, MxD) and layer.glu is not None and layer.d_hidden == 64
    assert layer.num_parameters() <= T.budget_parameters(32, 32, 256)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["layer"] == 1
    assert on_disk["x_scale"] > 1  # the tiny model's MLP inputs have norms below sqrt(d)
    # the saved layer has the scales folded in: it maps the model's own x to y on held-out text
    assert on_disk["eval_nmse"] < 1.0
    ids = torch.randint(0, 200, (2, 10))
    with spliced(tiny["model"], 1, layer), torch.no_grad():
        assert torch.isfinite(tiny["model"](input_ids=ids).logits).all()


def test_main_baseline_and_plot(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    args = [a for a in _args(tiny, out, "--arch", "skip-transcoder", "--eval-tokens", "0") if a != "--no-plot"]
    metrics = T.main(args)
    assert isinstance(T.load_layer(out), TopKTranscoder) and "ce_clean" not in metrics
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_limit_ends_the_run_at_a_logging_window_and_evaluates_it(tiny, tmp_path):
    out = tmp_path / "run"
    metrics = T.main(_args(tiny, out, "--time-limit", "1e-9"))
    assert metrics["time_limited"] and metrics["tokens"] == 5 * 48   # the first logging window
    assert math.isfinite(metrics["delta_ce"]) and (out / "layer.safetensors").exists()
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert not T.main(_args(tiny, tmp_path / "full", "--time-limit", "1e6", "--eval-tokens", "0"))["time_limited"]
    with pytest.raises(SystemExit, match="--time-limit"):
        T.main(_args(tiny, out, "--time-limit", "0"))


@pytest.mark.parametrize("option,value", [
    ("--experts", "0"), ("--hidden", "0"), ("--k", "0"), ("--lr", "-1"), ("--lr", "0"), ("--warmup", "-1"),
    ("--eval-tokens", "-5"), ("--budget", "0"), ("--log-every", "0"), ("--eval-batch", "0"), ("--dead-window", "0"),
    ("--stop-after", "0"), ("--threads", "0"), ("--checkpoint-every", "-1"), ("--lr", "inf"), ("--budget", "inf"),
    ("--experts", "3"),   # fewer than --k 4
    ("--seed", "-1"), ("--seed", str(2 ** 63 - 1)), ("--context", "1"), ("--out", ""),
])
def test_bad_options_exit_naming_the_option(tiny, tmp_path, option, value):
    """Checked before the model loads: an explicit 0 is not read as "the default"."""
    with pytest.raises(SystemExit, match=option):
        T.main(_args(tiny, tmp_path / "bad", option, value))


@pytest.mark.parametrize("option,value,message", [
    ("--device", "foo", "is not a device"), ("--device", "cuda:999", "CUDA device"),
    ("--model", "/no/such/model", "no file or folder"), ("--model", "./missing", "no file or folder"),
    ("--model", "missing.gguf", "no file or folder"),
] + ([("--backend", "triton", "Triton kernels on CPU tensors need the Triton interpreter"),
      ("--backend", "cuda", "needs CUDA tensors")] if not torch.cuda.is_available() else []))
def test_bad_device_or_model_exit_before_loading(tiny, tmp_path, option, value, message):
    with pytest.raises(SystemExit, match=f"{option}.*{message}"):
        T.main(_args(tiny, tmp_path / "bad", option, value))


@pytest.mark.parametrize("option,name,content,message", [
    ("--text", "missing.txt", None, "no text file or folder"),
    ("--text", "", None, "an empty path"),
    ("--text", "data.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "not a text file (it has NUL bytes"),
    ("--text", "empty.txt", "  \n", "no training documents"),
    ("--text", "bad.jsonl", '{"body": "x"}\n', 'bad.jsonl:1: no string field "text"'),
    ("--eval-text", "empty.txt", "", "no documents"),
    ("--eval-text", "bad.jsonl", "not json\n", "bad.jsonl:1: not JSON"),
])
def test_bad_text_exits_naming_the_option_before_loading(tiny, tmp_path, monkeypatch, option, name, content,
                                                         message):
    path = tmp_path / name if name else ""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    monkeypatch.setattr(D, "load_model", lambda *a, **k: pytest.fail("the model loaded before the text was read"))
    with pytest.raises(SystemExit, match=f"{option}: .*{re.escape(message)}"):
        T.main(_args(tiny, tmp_path / "bad", option, str(path)))


def test_model_without_mxd_activation_or_mlp_module_exits_naming_the_option(tiny, tmp_path, monkeypatch):
    model = copy.deepcopy(tiny["model"])
    model.config.hidden_act = "relu2"   # the config says relu2, the MLP's module computes silu: no exact form
    monkeypatch.setattr(D, "load_model", lambda *a, **k: (model, tiny["tokenizer"]))
    refusal = "--activation: the model's MLP activation 'relu2' has no MxD form \\(.+\\); choose"
    with pytest.raises(SystemExit, match=refusal):
        T.main(_args(tiny, tmp_path / "a"))
    for extra in (["--activation", "relu"], ["--arch", "transcoder"]):   # the layer needs none of the model's
        assert math.isfinite(T.main(_args(tiny, tmp_path / extra[1], "--eval-tokens", "0", *extra))["nmse"])
    block = model.model.layers[1]
    block.ffn = block.mlp
    del block.mlp
    with pytest.raises(SystemExit, match=r"--model .*: no MLP module named '<blocks>\.1\.mlp'"):
        T.main(_args(tiny, tmp_path / "c"))


def test_options_the_model_cannot_take_exit_naming_them(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--context 100 is longer than the model's 64 positions"):
        T.main(_args(tiny, tmp_path / "a", "--context", "100"))
    with pytest.raises(SystemExit, match="--budget 8.0 --k 200: .* fewer than k = 200: raise --budget, lower --k, "
                                         "or set --experts"):
        T.main(_args(tiny, tmp_path / "b", "--k", "200"))
    with pytest.raises(SystemExit, match="--budget 8.0 --k 4 --hidden 1000000000000: .* fewer than k = 4"):
        T.main(_args(tiny, tmp_path / "c", "--hidden", str(10 ** 12)))   # the cause is named
    huge = [("--experts", str(10 ** 13), "--budget 8.0 --k 4 --experts 10000000000000: .* parameters .* GiB, more "
                                         "than the whole"),
            ("--budget", "1e300", "--budget 1e.300 --k 4: no layer of .* experts can be built"),
            ("--buffer", str(10 ** 12), "--buffer 1000000000000: 1,000,000,000,000 rows of x and y in the pool need"),
            ("--harvest-contexts", str(10 ** 9), "--harvest-contexts 1000000000: .* harvested rows"),
            ("--batch", str(10 ** 12), "--batch 1000000000000: .* rows of x and y in a batch need")]
    for option, value, message in huge:        # refused at once, not a hang or an allocator error
        with pytest.raises(SystemExit, match=message):
            T.main(_args(tiny, tmp_path / "d", option, value))


def test_a_model_that_cannot_load_exits_naming_the_option(tiny, tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("no model here")
    with pytest.raises(SystemExit, match="--model .*notamodel: cannot load it"):
        T.main(_args(tiny, tmp_path / "a", "--model", str(tmp_path / "notamodel")))


def test_evaluation_reads_each_held_out_token_once(tiny, tmp_path, capsys):
    one_doc = tmp_path / "held.txt"
    one_doc.write_text(" ".join(["word"] * 60))   # about 300 byte-level tokens: 18 contexts of 16
    contexts = H.held_out_contexts([one_doc.read_text()], tiny["tokenizer"], 16, 1000)
    assert 10 < contexts.shape[0] < 1000 and len({tuple(c.tolist()) for c in contexts}) > 1
    metrics = T.main([a for a in _args(tiny, tmp_path / "run", "--eval-text", str(one_doc), "--eval-tokens", "16000")
                      if a != "--quiet"])
    assert metrics["eval_tokens"] == contexts.shape[0] * 15   # predicted tokens: 15 per context
    assert f"the held-out text has {contexts.shape[0]} contexts of 16 tokens, not the 1000" in capsys.readouterr().out
    few = H.held_out_contexts(["ab"], tiny["tokenizer"], 16, 4)
    assert few.shape == (0, 16)
    (tmp_path / "short.txt").write_text("ab")
    metrics = T.main([a for a in _args(tiny, tmp_path / "short", "--eval-text", str(tmp_path / "short.txt"))
                      if a != "--quiet"])
    assert "ce_clean" not in metrics
    assert "shorter than one context of 16 tokens: no CE evaluation" in capsys.readouterr().out
    # a single training file leaves no held-out document: said, and no CE keys
    metrics = T.main([a for a in _args(tiny, tmp_path / "one", "--text", str(one_doc)) if a != "--quiet"])
    assert "ce_clean" not in metrics and "no held-out documents (give --eval-text)" in capsys.readouterr().out


def test_summary_signs_the_ce_increase():
    text = stats.summary({"ce_clean": 3.0, "ce_spliced": 2.9995, "delta_ce": -0.0005, "ce_zero_ablation": 3.2,
                       "delta_ce_zero_ablation": 0.2}, Path("run"))
    assert "(-0.0005)" in text and "(+0.2000)" in text


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder"])
@pytest.mark.parametrize("option,value", [("--hidden", "16"), ("--activation", "relu"), ("--glu", "no")])
def test_mxd_only_options_are_refused_for_the_transcoders(tiny, tmp_path, arch, option, value):
    with pytest.raises(SystemExit, match=f"{option} sets the MxD layer; it does not apply to --arch {arch}"):
        T.main(_args(tiny, tmp_path / "bad", "--arch", arch, option, value))


def test_compile_trains_like_eager(tiny, tmp_path):
    """--compile (torch.compile of the training forward, the ops included) gives eager's losses."""
    torch._dynamo.reset()
    args = ("--eval-tokens", "0", "--seed", "5")
    eager = T.main(_args(tiny, tmp_path / "eager", *args))
    compiled = T.main(_args(tiny, tmp_path / "compiled", *args, "--compile"))
    assert compiled["tokens"] == eager["tokens"]
    for key in ("loss", "nmse"):
        assert math.isclose(compiled[key], eager[key], rel_tol=1e-4), key


def test_resume_equals_uninterrupted_run(tiny, tmp_path):
    from safetensors.torch import load_file
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--eval-tokens", "0", "--seed", "3", "--normalize", "scalar")
    T.main(_args(tiny, full, *args))
    stopped = T.main(_args(tiny, part, *args, "--stop-after", "7"))
    assert stopped["stopped"] and not (part / "layer.safetensors").exists()
    assert (part / "checkpoint-rank0.pt").exists()
    T.main(_args(tiny, part, *args, "--resume"))
    a, b = load_file(str(full / "layer.safetensors")), load_file(str(part / "layer.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((part / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_resume_refuses_other_options_and_may_train_longer(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--eval-tokens", "0", "--seed", "3")
    T.main(_args(tiny, out, *args, "--stop-after", "7"))
    for option, value in (("--k", "3"), ("--lr", "1e-3"), ("--batch", "24"), ("--seed", "4"), ("--layer", "0"),
                          ("--eval-text", tiny["jsonl"])):   # held-out documents leave the training ones
        with pytest.raises(SystemExit, match=f"--resume: .* other options \\({option} "):
            T.main(_args(tiny, out, *args, "--resume", option, value))
    with pytest.raises(SystemExit, match="--resume: .* is at step 7, past the 5 steps of --tokens 240; --tokens may "
                                         "grow, not shrink"):
        T.main(_args(tiny, out, *args, "--resume", "--tokens", "240"))
    with pytest.raises(SystemExit, match="other options \\(--batch 48 -> 240\\)"):   # not blamed on --tokens
        T.main(_args(tiny, out, *args, "--resume", "--batch", "240"))
    assert T.main(_args(tiny, out, *args, "--resume", "--tokens", "1200"))["tokens"] == 1200
    with pytest.raises(SystemExit, match="--resume: the run in .* has finished its 25 steps; raise --tokens"):
        T.main(_args(tiny, out, *args, "--resume", "--tokens", "1200"))
    # a resumed run that trained to its end but never wrote its metrics (saving failed) may be resumed again
    with monkeypatch.context() as m:
        m.setattr(layer_io, "save_layer", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            T.main(_args(tiny, out, *args, "--resume", "--tokens", "1440"))
    assert json.loads((out / "metrics.json").read_text())["tokens"] == 1200
    assert T.main(_args(tiny, out, *args, "--resume", "--tokens", "1440"))["tokens"] == 1440


def test_a_run_folder_is_not_overwritten_unless_asked(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--eval-tokens", "0")
    T.main(_args(tiny, out, *args, "--k", "3"))
    with pytest.raises(SystemExit, match="--out .* holds a run \\(.*config.json.*layer.safetensors.*\\): --resume it"):
        T.main(_args(tiny, out, *args, "--stop-after", "2"))
    assert T.load_layer(out).k == 3
    for bad in (("--context", "100"), ("--text", str(tmp_path / "typo.txt")), ("--k", "200")):
        with pytest.raises(SystemExit):   # a failing check leaves the old run alone
            T.main(_args(tiny, out, *args, "--overwrite", *bad))
        assert T.load_layer(out).k == 3
    T.main(_args(tiny, out, *args, "--stop-after", "2", "--overwrite"))   # the finished run's files are gone
    assert [p.name for p in T.run_files(out)] == ["checkpoint-rank0.pt"]
    with pytest.raises(SystemExit, match="--out .* holds a run \\(checkpoint-rank0.pt\\)"):
        T.main(_args(tiny, out, *args))
    with pytest.raises(SystemExit, match="give one of them"):
        T.main(_args(tiny, out, *args, "--resume", "--overwrite"))
    assert not T.main(_args(tiny, out, *args, "--resume")).get("stopped")
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        T.main(_args(tiny, tmp_path / "never", *args, "--resume"))
    assert not (tmp_path / "never").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--out .*file: exists and is not a folder"):
        T.main(_args(tiny, tmp_path / "file", *args))


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write(tmp_path / "a.txt", lambda p: Path(p).write_text("x"))
        os.umask(0o027)
        checkpoint.atomic_write(tmp_path / "b.txt", lambda p: Path(p).write_text("x"))
        os.umask(0o022)
        T.save_layer(T.build_layer("transcoder", 6, 6, 2, 8), tmp_path / "run")   # safetensors makes its file anew
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644   # not mkstemp's 0600
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / "layer.safetensors").stat().st_mode & 0o777 == 0o644


def test_train_compare_runs_each_arch_and_k_and_tables_them(tiny, tmp_path, capsys):
    from bench import train_compare as TC
    args = [a for a in _args(tiny, tmp_path, "--threads", "1") if a != "--quiet"]
    i = args.index("--k")
    del args[i:i + 2]
    i = args.index("--out")
    del args[i:i + 2]
    out = tmp_path / "compare"
    # MxD-only options go to the MxD runs only (the trainer refuses them for a transcoder)
    assert TC.main(["--k", "2,4", "--archs", "mxd,transcoder", "--jobs", "2", "--out", str(out), "--", *args,
                    "--glu", "yes", "--hidden=64"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [(r["arch"], r["k"]) for r in data["rows"]] == [("mxd", 2), ("transcoder", 2), ("mxd", 4),
                                                            ("transcoder", 4)]
    for r in data["rows"]:
        assert r["tokens"] == 960 and r["l0"] <= r["k"] and math.isfinite(r["delta_ce"])
        assert T.load_layer(out / f"{r['arch']}-k{r['k']}").num_parameters() == r["parameters"]
    text = (out / "compare.md").read_text()
    assert text.count("| 4 | transcoder |") == 1 and "K = 2: CE increase MxD" in text
    assert "K = 4: KL from the clean model MxD" in text
    assert text in capsys.readouterr().out
    # run again into the same folder: every run refuses it (it holds a run), and no old number is tabled
    assert TC.main(["--k", "2", "--archs", "mxd", "--out", str(out), "--", *args]) == 1
    again = json.loads((out / "compare.json").read_text())
    assert again["rows"] == [{"arch": "mxd", "k": 2}] and "holds a run" in again["failed"]["mxd K=2"]
    # a failed run is reported with its log, and the exit status says so
    assert TC.main(["--k", "3", "--archs", "mxd", "--out", str(tmp_path / "bad"), "--", *args, "--batch", "0"]) == 1
    assert "exit 1:" in (tmp_path / "bad" / "compare.md").read_text()
    assert "--batch must be >= 1" in (tmp_path / "bad" / "compare.md").read_text()
    capsys.readouterr()
    for bad, message in ((["--", "--k", "3"], "--k is set by bench.train_compare"), (["--archs", "nope"], "unknown arch"),
                         (["--k", "0"], "expected integers >= 1"), (["--jobs", "0"], "--jobs must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            TC.main(["--out", str(tmp_path / "x"), *bad])
        assert message in f"{exit_.value.code} {capsys.readouterr().err}", bad


def test_dense_reference_forward_matches_fast_path():
    """--backend reference trains the same layer through the paper's dense computation."""
    torch.manual_seed(0)
    for layer in (MxD(8, 12, 8, 20, 3, skip=True), TopKTranscoder(8, 20, 8, 3, skip=True)):
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 2 and p.abs().sum() == 0:
                    p.normal_()
        x = torch.randn(6, 8)
        fast = T.TrainForward(layer)(x)
        dense = T.TrainForward(layer, dense_reference=True)(x)
        for a, b in zip(fast, dense):
            torch.testing.assert_close(a, b)


def test_embedded_defaults_train_far_more_tokens_on_a_gpu(monkeypatch):
    """`make train` (no --model) keeps CPU-sized defaults on a CPU and trains far more tokens on CUDA."""
    parse = lambda *argv: cli.resolve_options(T.build_parser().parse_args(list(argv)))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse().tokens == T.EMBEDDED_DEFAULTS["tokens"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = parse()
    assert gpu.tokens == T.EMBEDDED_GPU_DEFAULTS["tokens"] >= 50 * T.EMBEDDED_DEFAULTS["tokens"]
    assert gpu.batch == 4096 and gpu.layer == T.EMBEDDED_DEFAULTS["layer"]
    assert parse("--device", "cpu").tokens == T.EMBEDDED_DEFAULTS["tokens"]
    assert parse("--tokens", "1000").tokens == 1000
    assert parse("--model", "gpt2").tokens == T.PAPER_DEFAULTS["tokens"]
