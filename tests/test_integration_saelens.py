"""The SAELens adapter (mxd_fast.integrations.saelens) on a tiny HookedTransformer built offline: an MxD
as an SAELens SAE, spliced in with HookedSAETransformer, saved and loaded, evaluated; a TopKTranscoder
exported to SAELens's built-in format and loaded by plain SAELens."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("sae_lens")
pytest.importorskip("transformer_lens")

import mxd_fast  # noqa: E402
from mxd_fast import reference  # noqa: E402
from mxd_fast.integrations import saelens as adapter  # noqa: E402
from sae_lens import SAE, HookedSAETransformer, TopKSAE  # noqa: E402
from sae_lens.evals import EvalConfig  # noqa: E402
from sae_lens.registry import SAE_CLASS_REGISTRY  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

D_MODEL = 32
LAYER = 1
HOOK_IN = f"blocks.{LAYER}.ln2.hook_normalized"
HOOK_OUT = f"blocks.{LAYER}.hook_mlp_out"
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16,
                                  act_fn="gelu", seed=0)
    return HookedSAETransformer(cfg).eval()


def trained(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The layer with every parameter random (a fresh MxD's decoder is zero: its output would be its bias)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return layer


def mxd(glu=False, skip=False, activation="gelu", d_in=D_MODEL, dtype=torch.float32) -> mxd_fast.MxD:
    return trained(mxd_fast.MxD(d_in, 16, D_MODEL, n_experts=24, k=4, activation=activation, glu=glu, skip=skip,
                                dtype=dtype))


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(seed))


def spliced_logits(model, layer, toks, hook_in=HOOK_IN, hook_out=HOOK_OUT) -> torch.Tensor:
    """The model's logits with the output hook replaced by the layer applied to the input hook, by plain
    TransformerLens hooks (no SAELens)."""
    captured = {}

    def capture(act, hook):
        captured["x"] = act
        return act

    def replace(act, hook):
        return layer(captured["x"])

    return model.run_with_hooks(toks, fwd_hooks=[(hook_in, capture), (hook_out, replace)])


def test_mxd_is_registered():
    assert SAE_CLASS_REGISTRY["mxd"] == (adapter.MxDSAE, adapter.MxDSAEConfig)


@pytest.mark.parametrize("glu,skip,activation", [(False, False, "gelu"), (True, True, "silu"),
                                                 (False, True, "relu")])
def test_sae_outputs_equal_layer(glu, skip, activation):
    layer = mxd(glu, skip, activation)
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    assert isinstance(sae, adapter.MxDSAE) and sae.cfg.d_sae == layer.n_experts
    x = torch.randn(2, 5, D_MODEL)
    feature_acts = sae.encode(x)
    z, values, indices = layer.encode(x)
    torch.testing.assert_close(feature_acts, reference.dense_coefficients(values, indices, layer.n_experts), **TOL)
    torch.testing.assert_close(sae.decode(feature_acts), layer(x), **TOL)
    torch.testing.assert_close(sae(x), layer(x), **TOL)
    out, acts = sae.forward_with_activations(x)
    torch.testing.assert_close(out, layer(x), **TOL)
    torch.testing.assert_close(acts, feature_acts)


def test_sae_float64_matches_closely():
    layer = mxd(glu=True, skip=True, dtype=torch.float64)
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    assert sae.cfg.dtype == "float64"
    x = torch.randn(7, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(sae(x), layer(x), rtol=1e-10, atol=1e-10)


def test_decode_of_edited_features_matches_layer_decode():
    layer = mxd(skip=True)
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    x = torch.randn(4, D_MODEL)
    z, values, indices = layer.encode(x)
    edited = values.clone()
    edited[:, 0] *= 3.0   # amplify the strongest expert of every token
    extra = torch.full((4, 1), 5, dtype=indices.dtype)   # and switch on expert 5 everywhere
    expected = layer.decode(x, z, torch.cat([edited, torch.full((4, 1), 0.7)], 1), torch.cat([indices, extra], 1))
    acts = sae.encode(x)
    acts = acts.scatter(-1, indices[:, :1], acts.gather(-1, indices[:, :1]) * 3.0)
    acts[:, 5] += 0.7
    torch.testing.assert_close(sae.decode(acts), expected, **TOL)
    torch.testing.assert_close(sae.decode_with_input(x, acts), expected, **TOL)


def test_decode_gradient_reaches_every_feature():
    layer = mxd()
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    x = torch.randn(3, D_MODEL)
    acts = sae.encode(x).detach().requires_grad_(True)
    sae.decode(acts).sum().backward()
    # d y / d a_n = c_n * (z D), for inactive experts too
    expected = (layer.hidden(x) @ layer.decoder) @ layer.experts.T
    torch.testing.assert_close(acts.grad, expected.detach(), **TOL)


def test_decode_needs_the_matching_encode():
    sae = adapter.to_saelens(mxd(), HOOK_IN, HOOK_OUT)
    x = torch.randn(3, D_MODEL)
    with pytest.raises(RuntimeError, match="encode"):
        sae.decode(torch.zeros(3, 24))
    acts = sae.encode(x)
    sae.decode(acts)
    with pytest.raises(RuntimeError, match="encode"):   # the input is used once
        sae.decode(acts)
    sae.encode(x)
    with pytest.raises(ValueError, match="feature_acts"):
        sae.decode(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="feature_acts"):
        sae.decode_with_input(x, torch.zeros(3, 23))
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.zeros(3, D_MODEL + 1))
    with pytest.raises(TypeError, match="feature_acts"):
        sae.decode_with_input(x, [0.0])


@pytest.mark.parametrize("hook_in", [HOOK_IN, f"blocks.{LAYER}.mlp.hook_in"])
def test_hooked_sae_transformer_splice_equals_hooked_layer(model, hook_in):
    layer = mxd(glu=True, skip=True)
    sae = adapter.to_saelens(layer, hook_in, HOOK_OUT, model=model)
    toks = tokens()
    expected = spliced_logits(model, layer, toks, hook_in=hook_in)
    clean = model(toks)
    assert (expected - clean).abs().max() > 1e-2   # the splice changes the logits
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]), expected, **TOL)
    torch.testing.assert_close(model(toks), clean)   # and run_with_saes took it out again


def test_run_with_cache_with_saes_caches_expert_coefficients(model):
    layer = mxd()
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, model=model)
    toks = tokens(2)
    logits, cache = model.run_with_cache_with_saes(toks, saes=[sae])
    torch.testing.assert_close(logits, spliced_logits(model, layer, toks), **TOL)
    _, values, indices = layer.encode(cache[HOOK_IN])
    torch.testing.assert_close(cache[f"{HOOK_OUT}.hook_sae_acts_post"],
                               reference.dense_coefficients(values, indices, layer.n_experts), **TOL)
    torch.testing.assert_close(cache[f"{HOOK_OUT}.hook_sae_output"], layer(cache[HOOK_IN]), **TOL)


def test_error_term_restores_the_clean_model(model):
    sae = adapter.to_saelens(mxd(skip=True), HOOK_IN, HOOK_OUT, model=model)
    toks = tokens(3)
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae], use_error_term=True), model(toks), **TOL)


def test_load_from_disk_round_trip(tmp_path):
    layer = mxd(glu=True, skip=True)
    folder = adapter.save_for_saelens(layer, tmp_path / "mxd", HOOK_IN, HOOK_OUT, model_name="tiny",
                                      metadata={"context_size": 9, "prepend_bos": False})
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "mxd" and cfg["d_sae"] == 24 and cfg["glu"] and cfg["skip"]
    assert cfg["metadata"]["hook_name"] == HOOK_IN and cfg["metadata"]["hook_name_out"] == HOOK_OUT
    loaded = SAE.load_from_disk(folder)
    assert isinstance(loaded, adapter.MxDSAE) and loaded.cfg.metadata.model_name == "tiny"
    original = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    x = torch.randn(5, D_MODEL)
    torch.testing.assert_close(loaded(x), layer(x), **TOL)
    back = adapter.from_saelens(loaded)
    assert isinstance(back, mxd_fast.MxD) and back.glu is not None and back.skip is not None
    for (name, p), (_, q) in zip(layer.named_parameters(), back.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def run_plain_python(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_topk_transcoder_export_loads_in_plain_saelens(tmp_path):
    layer = trained(mxd_fast.TopKTranscoder(D_MODEL, 40, D_MODEL, k=5))
    folder = adapter.save_for_saelens(layer, tmp_path / "topk", HOOK_IN, HOOK_OUT)
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "topk"
    x = torch.randn(2, 6, D_MODEL)
    torch.save(x, tmp_path / "x.pt")
    result = run_plain_python(f"""
        import sys, torch
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(folder)!r})
        assert "mxd_fast" not in sys.modules, "the adapter was imported"
        x = torch.load({str(tmp_path / 'x.pt')!r})
        torch.save({{"class": type(sae).__name__, "hook_name_out": sae.cfg.metadata.hook_name_out,
                    "acts": sae.encode(x), "out": sae(x)}}, {str(tmp_path / 'out.pt')!r})
    """)
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "TopKSAE" and out["hook_name_out"] == HOOK_OUT
    values, indices = layer.encode(x)
    torch.testing.assert_close(out["acts"], reference.dense_coefficients(values, indices, layer.width), **TOL)
    torch.testing.assert_close(out["out"], layer(x), **TOL)


def test_topk_transcoder_export_splices_as_a_transcoder(model):
    layer = trained(mxd_fast.TopKTranscoder(D_MODEL, 40, D_MODEL, k=5))
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, model=model)
    assert type(sae) is TopKSAE
    toks = tokens(4)
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]), spliced_logits(model, layer, toks), **TOL)
    back = adapter.from_saelens(sae)
    x = torch.randn(4, D_MODEL)
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)


def test_topk_transcoder_export_refusals():
    with pytest.raises(ValueError, match="skip"):
        adapter.to_saelens(mxd_fast.TopKTranscoder(D_MODEL, 40, D_MODEL, k=5, skip=True), HOOK_IN, HOOK_OUT)
    with pytest.raises(ValueError, match="d_in"):
        adapter.to_saelens(mxd_fast.TopKTranscoder(D_MODEL, 40, 16, k=5), HOOK_IN, HOOK_OUT)


def test_bad_hooks_and_layers_are_refused(model):
    layer = mxd()
    with pytest.raises(ValueError, match="hook_name_in.*not a hook point"):
        adapter.to_saelens(layer, "blocks.1.ln2.hook_normalised", HOOK_OUT, model=model)
    with pytest.raises(ValueError, match="hook_name_out.*not a hook point"):
        adapter.to_saelens(layer, HOOK_IN, "blocks.7.hook_mlp_out", model=model)
    with pytest.raises(ValueError, match="d_in = 16"):
        adapter.to_saelens(mxd(d_in=16), HOOK_IN, HOOK_OUT, model=model)
    with pytest.raises(ValueError, match=re.escape(f"d_in = 32, but hook_name_in = 'blocks.{LAYER}.mlp.hook_post' "
                                                   "carries activations 64 wide")):
        adapter.to_saelens(layer, f"blocks.{LAYER}.mlp.hook_post", HOOK_OUT, model=model)
    assert f"blocks.{LAYER}.hook_mlp_in" in model.hook_dict   # present, but off unless use_hook_mlp_in
    with pytest.raises(ValueError, match="never fires"):
        adapter.to_saelens(layer, f"blocks.{LAYER}.hook_mlp_in", HOOK_OUT, model=model)
    with pytest.raises(ValueError, match="fires after"):
        adapter.to_saelens(layer, HOOK_IN, "blocks.0.hook_mlp_out", model=model)
    with pytest.raises(ValueError, match="per-head"):
        adapter.to_saelens(layer, "blocks.1.attn.hook_z", HOOK_OUT, model=model)
    with pytest.raises(TypeError, match="hook_name_in"):
        adapter.to_saelens(layer, None, HOOK_OUT)
    with pytest.raises(TypeError, match="layer"):
        adapter.to_saelens(torch.nn.Linear(D_MODEL, D_MODEL), HOOK_IN, HOOK_OUT)
    with pytest.raises(TypeError, match="model"):
        adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="metadata"):
        adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, metadata={"hook_name": "x"})
    with pytest.raises(ValueError, match="dtype"):
        adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, dtype=torch.int32)
    adapter.check_sae_hooks(adapter.to_saelens(layer, HOOK_IN, HOOK_OUT), model)


def test_layer_with_forward_hooks_is_refused():
    layer = mxd()
    with layer.encoder.register_forward_hook(lambda module, args, out: out * 2):
        with pytest.raises(ValueError, match="forward hooks on encoder"):
            adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)
    adapter.to_saelens(layer, HOOK_IN, HOOK_OUT)   # accepted once the hook is gone


def test_config_and_folding_refusals():
    base = dict(d_in=8, d_sae=6, d_out=8, d_hidden=4, k=2)
    for bad, match in ((dict(k=7), "k must"), (dict(d_hidden=0), "d_hidden"), (dict(activation="tanh"), "activation"),
                       (dict(apply_b_dec_to_input=True), "apply_b_dec_to_input"),
                       (dict(normalize_activations="layer_norm"), "normalize_activations"),
                       (dict(reshape_activations="hook_z"), "reshape_activations")):
        with pytest.raises(ValueError, match=match):
            adapter.MxDSAEConfig(**{**base, **bad})
    sae = adapter.MxDSAE(adapter.MxDSAEConfig(**base))
    with pytest.raises(NotImplementedError, match="fold_W_dec_norm"):
        sae.fold_W_dec_norm()
    with pytest.raises(NotImplementedError, match="fold_activation_norm_scaling_factor"):
        sae.fold_activation_norm_scaling_factor(2.0)
    sae._use_error_term = True
    with pytest.raises(ValueError, match="use_error_term"):
        sae(torch.zeros(1, 8))


def test_fresh_sae_is_initialised_like_a_fresh_mxd():
    torch.manual_seed(3)
    sae = adapter.MxDSAE(adapter.MxDSAEConfig(d_in=8, d_sae=6, d_out=8, d_hidden=4, k=2, glu=True))
    torch.manual_seed(3)
    layer = mxd_fast.MxD(8, 4, 8, n_experts=6, k=2, glu=True)
    expected = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT).state_dict()
    assert sae.state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(sae.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def make_activation_store(model, sae, n_rows: int = 4, context: int = 9):
    datasets = pytest.importorskip("datasets")
    from sae_lens.training.activations_store import ActivationsStore
    rows = torch.randint(0, 50, (n_rows, context), generator=torch.Generator().manual_seed(5))
    dataset = datasets.Dataset.from_dict({"tokens": rows.tolist()})
    store = ActivationsStore.from_sae(model, sae, dataset, streaming=False, context_size=context,
                                      store_batch_size_prompts=n_rows, n_batches_in_buffer=1,
                                      train_batch_size_tokens=n_rows * context, total_tokens=n_rows * context)
    return store, rows


def test_run_transcoder_evals_sparsity_and_density(model):
    layer = mxd()
    sae = adapter.to_saelens(layer, HOOK_IN, HOOK_OUT, model=model, metadata={"context_size": 9,
                                                                              "prepend_bos": False})
    store, rows = make_activation_store(model, sae)
    config = EvalConfig(compute_sparsity_metrics=True, compute_featurewise_density_statistics=True,
                        n_eval_sparsity_variance_batches=1)
    metrics, feature_metrics = adapter.run_transcoder_evals(sae, store, model, config, exclude_special_tokens=False)
    # independently: the same tokens through the model and the mxd_fast layer
    _, cache = model.run_with_cache(rows, names_filter=[HOOK_IN])
    _, values, indices = layer.encode(cache[HOOK_IN])
    active = reference.dense_coefficients(values, indices, layer.n_experts) != 0
    assert metrics["sparsity"]["l0"] == pytest.approx(active.sum(-1).float().mean().item(), rel=1e-6)
    assert metrics["sparsity"]["l1"] == pytest.approx(values.sum(-1).mean().item(), rel=1e-4)
    density = active.flatten(0, 1).float().mean(0)
    torch.testing.assert_close(torch.tensor(feature_metrics["feature_density"]), density)


@pytest.mark.parametrize("flag", ["compute_kl", "compute_ce_loss", "compute_l2_norms", "compute_variance_metrics",
                                  "compute_featurewise_weight_based_metrics"])
def test_run_transcoder_evals_refuses_autoencoder_metrics(model, flag):
    sae = adapter.to_saelens(mxd(), HOOK_IN, HOOK_OUT, model=model)
    with pytest.raises(ValueError, match=f"eval_config.{flag}"):
        adapter.run_transcoder_evals(sae, None, model, EvalConfig(**{flag: True}))


def test_import_mxd_fast_stays_light():
    result = run_plain_python("""
        import sys, mxd_fast
        heavy = [m for m in ("sae_lens", "transformer_lens", "sparsify", "mxd_fast.integrations.saelens")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    assert result.returncode == 0, result.stderr
