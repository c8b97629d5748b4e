"""Harvesting, splicing and evaluating through a TransformerLens HookedTransformer and an nnsight LanguageModel,
as through a transformers model (mxd_fast.train.models), on tiny random models built from configs (no
network): the harvested pairs are what the models' own hooks see, a splice of a layer equal to the MLP leaves
the logits unchanged, and the same weights give the same numbers on every path."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mxd_fast import MxD  # noqa: E402
from mxd_fast import harvest as H  # noqa: E402
from mxd_fast.evaluate import SplicedMLP, ZeroMLP, cross_entropy, evaluate, splice_layer, spliced  # noqa: E402
from mxd_fast.module import ACTIVATIONS  # noqa: E402
from mxd_fast.train.models import adapt  # noqa: E402

LAYER = 1


def _ids(n: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=64)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def _mxd(activation: str = "gelu_new") -> MxD:
    torch.manual_seed(1)
    layer = MxD(32, 64, 32, 8, 2, activation=activation)
    nn.init.normal_(layer.decoder, std=0.1)   # a layer that changes the model's output
    return layer


class Recompute(nn.Module):
    """Stands in for the MLP by calling the model's own MLP module."""
    _is_mlp_replacement = True

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, *args, **kwargs):
        return self.mlp(x)


# ---- TransformerLens -------------------------------------------------------------------------

lens = pytest.importorskip("transformer_lens")


def _lens_config(**changes):
    base = dict(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=32, d_vocab=128, act_fn="gelu_new",
                normalization_type="LN", eps=1e-5, positional_embedding_type="standard", default_prepend_bos=False)
    return lens.HookedTransformerConfig(**{**base, **changes})


def _lens(**changes):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TransformerLens 3 points to TransformerBridge
        return lens.HookedTransformer(_lens_config(**changes)).eval().requires_grad_(False)


def _lens_from(hf):
    """A HookedTransformer holding the weights of the transformers GPT-2 `hf` (nothing folded)."""
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    model = _lens()
    model.load_and_process_state_dict(convert_gpt2_weights(hf, model.cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return model.eval().requires_grad_(False)


def test_lens_model_sizes_and_activation_come_from_its_cfg():
    model = _lens()
    assert H.num_layers(model) == 2 and H.max_positions(model) == 32
    assert H.model_dims(model, LAYER) == {"d": 32, "hidden": 64, "activation": "gelu_new",
                                          "model_activation": "gelu_new", "activation_refusal": None, "glu": False}
    parent, attr, mlp = H.find_mlp(model, LAYER)
    assert parent is model.blocks[LAYER] and attr == "mlp" and mlp is model.blocks[LAYER].mlp
    with pytest.raises(ValueError, match="it has 2 layers"):
        H.find_mlp(model, 2)


@pytest.mark.parametrize("act_fn,key", [("gelu_new", "gelu_new"), ("gelu", "gelu"), ("gelu_fast", "gelu_fast"),
                                        ("gelu_pytorch_tanh", "gelu_tanh"), ("silu", "silu"), ("relu", "relu"),
                                        ("relu2", "relu2")])
def test_lens_activation_is_reproduced_exactly(act_fn, key):
    model = _lens(act_fn=act_fn)
    assert H.model_dims(model, LAYER)["activation"] == key
    t = torch.randn(8192, generator=torch.Generator().manual_seed(2)) * 8
    assert torch.equal(ACTIVATIONS[key](t), model.blocks[LAYER].mlp.act_fn(t))


@pytest.mark.parametrize("act_fn,why", [("solu_ln", "followed by a LayerNorm"), ("xielu", "learned parameters"),
                                        ("solu", "no activation that computes exactly what solu computes")])
def test_lens_activation_without_an_exact_form_is_refused(act_fn, why):
    model = _lens(act_fn=act_fn)
    dims = H.model_dims(model, LAYER)
    assert dims["activation"] is None and dims["model_activation"] == act_fn
    assert why in adapt(model).mlp(LAYER).activation()[1]


def test_lens_gated_mlp_and_attention_only_model():
    assert H.model_dims(_lens(gated_mlp=True, act_fn="silu"), LAYER)["glu"] is True
    with pytest.raises(ValueError, match="has no MLP"):
        H.model_dims(_lens(attn_only=True), LAYER)


def test_lens_harvest_is_what_its_hooks_see():
    model = _lens()
    ids = _ids()
    _, cache = model.run_with_cache(ids)
    block = model.blocks[LAYER]
    with H.Harvester(model, LAYER) as harvester:
        x, y = harvester.harvest(ids)
    with torch.no_grad():   # the MLP's input: ln2 (with its weight and bias) of the residual stream mid-block
        x_ref = block.ln2(cache[f"blocks.{LAYER}.hook_resid_mid"])
    assert torch.equal(x, x_ref.reshape(-1, 32))
    assert torch.equal(y, cache[f"blocks.{LAYER}.hook_mlp_out"].reshape(-1, 32))
    assert len(block.mlp._forward_hooks) == 0 and len(block.mlp._forward_pre_hooks) == 0


def test_lens_splice_of_its_own_mlp_keeps_the_logits_and_hooks_see_the_new_layer():
    model = _lens()
    ids = _ids()
    with torch.no_grad():
        clean = model(ids)
    mlp = model.blocks[LAYER].mlp
    old = splice_layer(model, LAYER, Recompute(mlp))
    with torch.no_grad():
        assert torch.equal(model(ids), clean)
    assert splice_layer(model, LAYER, old).mlp is mlp and model.blocks[LAYER].mlp is mlp
    layer = _mxd()
    with spliced(model, LAYER, layer):
        assert isinstance(model.blocks[LAYER].mlp, SplicedMLP)
        assert f"blocks.{LAYER}.mlp.layer" in model.mod_dict   # TransformerLens lists what runs now
        assert f"blocks.{LAYER}.mlp.hook_post" not in model.hook_dict
        with torch.no_grad():
            _, cache = model.run_with_cache(ids)
        x = model.blocks[LAYER].ln2(cache[f"blocks.{LAYER}.hook_resid_mid"])
        assert torch.allclose(cache[f"blocks.{LAYER}.hook_mlp_out"], layer(x.reshape(-1, 32)).reshape(x.shape),
                              atol=1e-6)
    assert model.blocks[LAYER].mlp is mlp and f"blocks.{LAYER}.mlp.hook_post" in model.hook_dict


def test_lens_and_transformers_give_the_same_numbers_with_the_same_weights():
    hf = _gpt2()
    model = _lens_from(hf)
    ids = _ids(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with H.Harvester(model, LAYER) as a, H.Harvester(hf, LAYER) as b:
        (x1, y1), (x2, y2) = a.harvest(ids), b.harvest(ids)
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    assert cross_entropy(model, ids) == pytest.approx(cross_entropy(hf, ids), abs=1e-5)
    layer = _mxd()
    got, want = evaluate(model, layer, LAYER, ids), evaluate(hf, layer, LAYER, ids)
    assert got["eval_tokens"] == want["eval_tokens"] == 27
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_spliced", "eval_nmse"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got["ce_spliced"] != pytest.approx(got["ce_clean"], abs=1e-4)   # the layer did go in
    assert torch.equal(model.blocks[LAYER].mlp.W_in, hf.transformer.h[LAYER].mlp.c_fc.weight)   # put back


def test_lens_contexts_longer_than_n_ctx_are_refused():
    with pytest.raises(ValueError, match="longer than the model's 32 positions"):
        cross_entropy(_lens(), _ids(1, 40))


# ---- nnsight -----------------------------------------------------------------------------------

nnsight = pytest.importorskip("nnsight")


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _language_model(hf):
    """nnsight's LanguageModel around an existing transformers model (offline: the model object and a
    tokenizer are given, nothing is loaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # LanguageModel is deprecated in favour of TransformersModel
        return nnsight.LanguageModel(hf, tokenizer=_byte_tokenizer())


def _opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=32, word_embed_proj_dim=32)
    return OPTForCausalLM(config).eval().requires_grad_(False)


def _trace(lm, ids, module_path: str):
    """(logits, the output of the module at `module_path`) read in an nnsight trace."""
    with lm.trace(ids):
        envoy = lm
        for part in module_path.split("."):
            envoy = getattr(envoy, part)
        out = envoy.output.save()
        logits = lm.lm_head.output.save()
    return logits, out


def test_nnsight_model_is_read_through_its_transformers_model():
    hf = _gpt2()
    lm = _language_model(hf)
    assert adapt(lm).module is hf
    assert H.model_dims(lm, LAYER) == H.model_dims(hf, LAYER)
    assert H.num_layers(lm) == 2 and H.max_positions(lm) == 32
    ids = _ids()
    with H.Harvester(lm, LAYER) as a, H.Harvester(hf, LAYER) as b:
        (x1, y1), (x2, y2) = a.harvest(ids), b.harvest(ids)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _, mlp_out = _trace(lm, ids, f"transformer.h.{LAYER}.mlp")
    assert torch.equal(y1, mlp_out.reshape(-1, 32))   # what nnsight itself reads at the MLP's output
    assert cross_entropy(lm, ids) == cross_entropy(hf, ids)
    layer = _mxd()
    assert evaluate(lm, layer, LAYER, ids) == evaluate(hf, layer, LAYER, ids)


def test_nnsight_traces_see_the_spliced_layer_and_the_restored_mlp():
    hf = _gpt2()
    lm = _language_model(hf)
    ids = _ids()
    path = f"transformer.h.{LAYER}.mlp"
    clean_logits, clean_out = _trace(lm, ids, path)
    old = splice_layer(lm, LAYER, ZeroMLP())
    logits, out = _trace(lm, ids, path)       # the trace runs the module now in the MLP's place
    assert torch.equal(out, torch.zeros_like(out)) and not torch.equal(logits, clean_logits)
    splice_layer(lm, LAYER, old)
    logits, out = _trace(lm, ids, path)
    assert torch.equal(logits, clean_logits) and torch.equal(out, clean_out)
    assert hf.transformer.h[LAYER].mlp is old


def test_nnsight_opt_splices_the_parts_of_its_decoder_layer():
    hf = _opt()
    lm = _language_model(hf)
    ids = _ids()
    fc2 = f"model.decoder.layers.{LAYER}.fc2"
    clean_logits, clean_fc2 = _trace(lm, ids, fc2)
    with H.Harvester(lm, LAYER) as harvester:
        x, y = harvester.harvest(ids)
    assert torch.equal(y, clean_fc2.reshape(-1, 32))
    old = splice_layer(lm, LAYER, Recompute(H.find_mlp(lm, LAYER)[2]))
    logits, out = _trace(lm, ids, fc2)        # fc2's place now holds the layer: its output is the MLP's
    assert torch.equal(logits, clean_logits) and torch.equal(out, clean_fc2)
    splice_layer(lm, LAYER, old)
    layer = _mxd("relu")
    with spliced(lm, LAYER, layer):
        _, out = _trace(lm, ids, fc2)
    torch.testing.assert_close(out.reshape(-1, 32), layer(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(_trace(lm, ids, fc2)[0], clean_logits)
    metrics = evaluate(lm, layer, LAYER, ids)
    assert math.isfinite(metrics["ce_spliced"]) and metrics["eval_tokens"] == 14


def test_anything_else_is_refused_by_name():
    for bad in (nn.Linear(4, 4), object()):
        with pytest.raises(TypeError, match="model must be a transformers causal LM, a TransformerLens "
                                            "HookedTransformer or an nnsight LanguageModel"):
            H.num_layers(bad)
    with pytest.raises(TypeError, match="model must be"):
        cross_entropy(nn.Linear(4, 4), _ids())
