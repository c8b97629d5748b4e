"""The trainer's model side on every kind of transformers architecture, each built from a tiny config (no
network): where its MLP is, that the layer's activation is exactly the MLP's own, that harvesting reads
exactly what the MLP receives and returns, that a splice puts a layer exactly in the MLP's place (a layer that
recomputes the MLP from the model's own modules leaves the logits bitwise unchanged), a training step and an
evaluation with the layer spliced in; or a refusal that says why. docs/architectures.md lists the outcome of
every causal-LM architecture of transformers (the `slow` sweep at the end checks them all)."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mxd_fast import harvest as H  # noqa: E402
from mxd_fast.evaluate import evaluate, splice_layer, spliced  # noqa: E402
from mxd_fast.module import ACTIVATIONS  # noqa: E402
from mxd_fast.train import TrainForward, build_layer, make_optimizer, train_step  # noqa: E402
from mxd_fast.train.models import adapt  # noqa: E402

LAYER = 1
TINY = dict(hidden_size=32, n_embd=32, d_model=32, intermediate_size=64, n_inner=64, ffn_dim=64, ffn_hidden_size=64,
            dff=64, num_hidden_layers=2, n_layer=2, num_layers=2, decoder_layers=2, n_layers=2,
            num_attention_heads=4, n_head=4, num_heads=4, decoder_attention_heads=4, n_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, n_positions=64, head_dim=8,
            moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, word_embed_proj_dim=32, rotary_dim=4, kv_channels=8,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
            # multi-head latent attention (DeepSeek-style)
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
            index_head_dim=8, index_n_heads=2, n_group=1, topk_group=1,
            # state-space layers of hybrid models
            mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=8, mamba_n_groups=1, mamba_ngroups=1,
            mamba_dt_rank=8, mamba_headdim=8, n_mamba_heads=8, attention_head_dim=8, state_size=8, n_groups=1,
            time_step_rank=8, chunk_size=8, embedding_dim=32, adapter_rank=8, shared_intermediate_size=32)
# Model types whose sizes need more than TINY to fit together.
CONFIGS = {"mamba2": {"num_heads": 8}, "prophetnet": {"num_encoder_layers": 2, "num_decoder_layers": 2},
           "gpt_neo": {"attention_types": [[["global", "local"], 1]]}, "falcon_h1": {"mamba_d_ssm": 64},
           "zaya": {"num_experts_per_tok": 1}, "dots1": {"n_shared_experts": 1},
           "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
           "gemma3n_text": {"num_kv_shared_layers": 0}, "kimi_linear": {"num_experts": 4, "num_experts_per_token": 2},
           "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [8, 8],
                        "attn_layers": ["local", "local"], "feed_forward_size": 64, "attention_head_size": 8,
                        "local_attn_chunk_length": 4},
           "zamba": {"layer_types": ["hybrid", "hybrid"]},
           "zamba2": {"layer_types": ["mamba", "hybrid"], "hybrid_layer_ids": [1]}}
for _mla in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "hy_v4",
             "longcat_flash", "minicpm3", "youtu", "dots3_note", "dots3_note_text"):
    CONFIGS[_mla] = {"num_key_value_heads": 4}   # one key and value per head


@dataclass
class Arch:
    """model_type, config changes, where block LAYER's MLP is (blocks: the ModuleList; mlp: the MLP module,
    or the (input map, activation, output map) paths of its parts, relative to the block; act: its
    activation's path) and the ACTIVATIONS key expected (None: refused, `why` says how)."""
    model_type: str
    blocks: str
    mlp: Union[str, tuple]
    act: str
    key: Optional[str]
    config: dict = field(default_factory=dict)
    why: str = ""
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.model_type


LLAMA_LIKE = dict(blocks="model.layers", mlp="mlp", act="mlp.act_fn")
SUPPORTED = [
    Arch("gpt2", "transformer.h", "mlp", "mlp.act", "gelu_new"),
    Arch("gpt2", "transformer.h", "mlp", "mlp.act", "quick_gelu", {"activation_function": "quick_gelu"},
         name="gpt2-quick_gelu"),
    Arch("gpt2", "transformer.h", "mlp", "mlp.act", "gelu_fast", {"activation_function": "gelu_fast"},
         name="gpt2-gelu_fast"),
    Arch("gpt2", "transformer.h", "mlp", "mlp.act", "gelu_tanh", {"activation_function": "gelu_pytorch_tanh"},
         name="gpt2-gelu_pytorch_tanh"),
    Arch("gpt2", "transformer.h", "mlp", "mlp.act", "relu", {"activation_function": "relu"}, name="gpt2-relu"),
    Arch("openai-gpt", "transformer.h", "mlp", "mlp.act", "gelu_new"),
    Arch("gpt_neo", "transformer.h", "mlp", "mlp.act", "gelu_new"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", "gelu"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", "silu", {"hidden_act": "swish"}, name="gpt_neox-swish"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", "sigmoid", {"hidden_act": "sigmoid"},
         name="gpt_neox-sigmoid"),
    Arch("llama", key="silu", **LLAMA_LIKE),
    Arch("mistral", key="silu", **LLAMA_LIKE),
    Arch("qwen2", key="silu", **LLAMA_LIKE),
    Arch("qwen3", key="silu", **LLAMA_LIKE),
    Arch("qwen3_moe", key="silu", config={"mlp_only_layers": [LAYER]}, name="qwen3_moe-dense-layer", **LLAMA_LIKE),
    Arch("gemma", key="gelu_tanh", **LLAMA_LIKE),
    Arch("gemma2", key="gelu_tanh", **LLAMA_LIKE),
    Arch("gemma3_text", key="gelu_tanh", **LLAMA_LIKE),
    Arch("olmo", key="silu", **LLAMA_LIKE),
    Arch("olmo2", key="silu", **LLAMA_LIKE),
    Arch("stablelm", key="silu", **LLAMA_LIKE),
    Arch("nemotron", key="relu2", **LLAMA_LIKE),
    Arch("bitnet", key="relu2", **LLAMA_LIKE),
    Arch("phi", "model.layers", "mlp", "mlp.activation_fn", "gelu_new"),
    Arch("phi3", "model.layers", "mlp", "mlp.activation_fn", "silu"),
    Arch("persimmon", "model.layers", "mlp", "mlp.act", "relu2"),
    Arch("starcoder2", "model.layers", "mlp", "mlp.act", "gelu_tanh"),
    Arch("falcon", "transformer.h", "mlp", "mlp.act", "gelu"),
    Arch("gpt_bigcode", "transformer.h", "mlp", "mlp.act", "gelu_tanh"),
    Arch("gptj", "transformer.h", "mlp", "mlp.act", "gelu_new"),
    Arch("codegen", "transformer.h", "mlp", "mlp.act", "gelu_new"),
    Arch("ctrl", "transformer.h", "ffn", "ffn.1", "relu"),
    Arch("bloom", "transformer.h", ("mlp.dense_h_to_4h", "mlp.gelu_impl", "mlp.dense_4h_to_h"), "mlp.gelu_impl",
         "gelu_bloom"),
    Arch("mpt", "transformer.blocks", ("ffn.up_proj", "ffn.act", "ffn.down_proj"), "ffn.act", "gelu"),
    Arch("opt", "model.decoder.layers", ("fc1", "activation_fn", "fc2"), "activation_fn", "relu"),
    Arch("opt", "model.decoder.layers", ("fc1", "activation_fn", "fc2"), "activation_fn", "relu",
         {"do_layer_norm_before": False}, name="opt-post-norm"),
    Arch("bart", "model.decoder.layers", ("fc1", "activation_fn", "fc2"), "activation_fn", "gelu"),
    Arch("xglm", "model.layers", ("fc1", "activation_fn", "fc2"), "activation_fn", "gelu"),
    Arch("bert", "bert.encoder.layer", ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),
         "intermediate.intermediate_act_fn", "gelu", {"is_decoder": True}),
]

# The activation is refused (model_dims gives activation None and says why); harvesting and splicing work.
ACTIVATION_REFUSED = [
    Arch("apertus", "model.layers", "mlp", "mlp.act_fn", None, why="XIELUActivation has learned parameters"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", None, {"hidden_act": "gelu_python"},
         why="GELUActivation does not compute exactly what mxd_fast's 'gelu' computes", name="gpt_neox-gelu_python"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", None, {"hidden_act": "gelu_10"},
         why="no activation that computes exactly what ClippedGELUActivation computes", name="gpt_neox-gelu_10"),
    Arch("gpt_neox", "gpt_neox.layers", "mlp", "mlp.act", None, {"hidden_act": "tanh"},
         why="no activation that computes exactly what Tanh computes", name="gpt_neox-tanh"),
    Arch("gemma3n_text", "model.layers", "mlp", "mlp.act_fn", None, {"activation_sparsity_pattern": [0.95, 0.95]},
         why="GELUTanh of pre-activations sparsified to their top 5% (activation_sparsity = 0.95)",
         name="gemma3n_text-sparse"),
    Arch("lfm2", "model.layers", "feed_forward", "", None, why="applies its activation inline"),
]

# The block's MLP cannot be replaced by one MxD layer: every entry point refuses it, saying why.
REFUSED = [
    ("mixtral", {}, r"model\.layers\.1\.mlp is a mixture of experts \(MixtralSparseMoeBlock\)"),
    ("qwen3_moe", {}, r"model\.layers\.1\.mlp is a mixture of experts \(Qwen3MoeSparseMoeBlock\)"),
    ("qwen2_moe", {}, r"is a mixture of experts \(Qwen2MoeSparseMoeBlock\)"),
    ("granitemoe", {}, r"model\.layers\.1\.block_sparse_moe is a mixture of experts"),
    ("gpt_oss", {}, r"is a mixture of experts \(GptOssMLP\)"),
    ("mamba", {}, r"no MLP module named '<blocks>\.1\.mlp' in the model \(block backbone\.layers\.1 has: norm, "
                  r"mixer\)"),
    ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}, r"computes its output map in slices"),
    ("zamba", {}, r"no MLP module named '<blocks>\.1\.mlp' in the model \(block model\.layers\.1 has: "
                  r"shared_transf, linear, mamba_decoder\)"),
    ("hrm_text", {}, r"hrm_text: its reasoning modules run their blocks several times per forward pass"),
    ("rwkv", {}, r"no MLP module named '<blocks>\.1\.mlp' in the model \(block rwkv\.blocks\.1 has: ln1, ln2, "
                 r"attention, feed_forward\)"),
]


def _tiny_sizes(config, changes: dict) -> dict:
    """The TINY sizes (and `changes`) for the fields `config` has."""
    fields = config.to_dict()
    return {**{k: v for k, v in TINY.items() if k in fields}, **changes}


def build(model_type: str, config: Optional[dict] = None) -> nn.Module:
    """A 2-block causal LM of `model_type` from its default config with TINY sizes (given to the config class,
    so that the sizes it derives follow), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    changes = {**CONFIGS.get(model_type, {}), **(config or {})}
    default = AutoConfig.for_model(model_type)
    kwargs = _tiny_sizes(default, changes)
    text = default.get_text_config()
    if text is not default:
        sub = next(k for k, v in vars(default).items() if v is text)
        kwargs[sub] = _tiny_sizes(text, changes)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    if model_type == "xmod":
        model.set_default_language("en_XX")   # its adapters are chosen by language
    return model.eval().requires_grad_(False)


def _ids(n: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 120, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class Recompute(nn.Module):
    """Computes the MLP from the model's own modules (the MLP module, or its parts in sequence), recording
    what it receives and returns."""
    _is_mlp_replacement = True

    def __init__(self, modules: list):
        super().__init__()
        self.parts = modules
        self.seen: list = []

    def forward(self, x, *args, **kwargs):
        y = x
        for module in self.parts:
            y = module(y)
        self.seen.append((x.clone(), y.clone()))
        return y


def _points(block: nn.Module, arch: Arch) -> list:
    """The table's own modules of the MLP: [mlp] or [input map, activation, output map]."""
    paths = (arch.mlp,) if isinstance(arch.mlp, str) else arch.mlp
    return [block.get_submodule(p) for p in paths]


def _hooked_reference(model, block, arch, ids):
    """Clean logits and the MLP's (input, output) read by hooks the test sets itself at the table's places."""
    points = _points(block, arch)
    seen = {}
    hooks = [points[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone())),
             points[-1].register_forward_hook(
                 lambda m, a, o: seen.__setitem__("y", (o[0] if isinstance(o, tuple) else o).clone()))]
    try:
        clean = _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return clean, seen["x"].reshape(-1, seen["x"].shape[-1]), seen["y"].reshape(-1, seen["y"].shape[-1])


def _check_exact_activation(block: nn.Module, arch: Arch, key: str) -> None:
    act = block.get_submodule(arch.act)
    t = torch.randn(8192, generator=torch.Generator().manual_seed(2)) * 8
    assert torch.equal(ACTIVATIONS[key](t), act(t.clone())), arch.name


def _check_identity_splice(model, block, arch, ids, clean, x, y) -> None:
    """A layer recomputing the MLP from the model's own modules, spliced in, leaves the logits bitwise the
    same and receives exactly the harvested x (and gives y); restoring puts every module back."""
    points = _points(block, arch)
    recompute = Recompute(points)
    old = splice_layer(model, LAYER, recompute)
    assert torch.equal(_logits(model, ids), clean), arch.name
    (seen_x, seen_y), = recompute.seen
    assert torch.equal(seen_x.reshape(x.shape), x) and torch.equal(seen_y.reshape(y.shape), y)
    splice_layer(model, LAYER, old)
    assert all(a is b for a, b in zip(_points(block, arch), points))
    assert torch.equal(_logits(model, ids), clean)


def _train_and_evaluate(model, dims: dict, x, y, ids) -> None:
    """A small MxD of the model's width, one training step on the harvested rows, spliced in, evaluated."""
    torch.manual_seed(3)
    layer = build_layer("mxd", dims["d"], dims["d"], 2, 8, d_hidden=dims["hidden"], activation=dims["activation"],
                        glu=dims["glu"])
    layer.normalize_experts()
    optimizer, scheduler = make_optimizer(layer, 1e-2, 1)
    before = [p.detach().clone() for p in layer.parameters()]
    loss = train_step(TrainForward(layer), layer, optimizer, scheduler, x, y)[0]
    assert math.isfinite(float(loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    with spliced(model, LAYER, layer):
        logits = _logits(model, ids)
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    metrics = evaluate(model, layer, LAYER, ids)
    assert metrics["eval_tokens"] == ids.numel() - ids.shape[0]
    assert all(math.isfinite(metrics[k]) for k in ("ce_clean", "ce_spliced", "ce_zero_ablation", "eval_nmse"))


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_supported_architecture_is_read_spliced_and_trained_exactly(arch):
    model = build(arch.model_type, arch.config)
    block = model.get_submodule(arch.blocks)[LAYER]
    dims = H.model_dims(model, LAYER)
    assert dims["activation"] == arch.key, (arch.name, dims)
    _check_exact_activation(block, arch, arch.key)
    ids = _ids()
    clean, x_ref, y_ref = _hooked_reference(model, block, arch, ids)
    with H.Harvester(model, LAYER) as harvester:
        x, y = harvester.harvest(ids)
        _, (x_full, y_full) = harvester.run_and_capture(ids)   # past the MLP too (Falcon adds to its output in place)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert torch.equal(x_full, x) and torch.equal(y_full, y)
    assert x.shape == (ids.numel(), dims["d"]) and y.shape == x.shape
    _check_identity_splice(model, block, arch, ids, clean, x, y)
    _train_and_evaluate(model, dims, x, y, ids)
    assert torch.equal(_logits(model, ids), clean)   # evaluate and spliced left the model as it was


@pytest.mark.parametrize("arch", ACTIVATION_REFUSED, ids=lambda a: a.name)
def test_an_activation_without_an_exact_form_is_refused_by_name(arch):
    model = build(arch.model_type, arch.config)
    dims = H.model_dims(model, LAYER)
    assert dims["activation"] is None
    key, why = adapt(model).mlp(LAYER).activation()
    assert key is None and arch.why in why
    block = model.get_submodule(arch.blocks)[LAYER]
    ids = _ids()
    clean, x_ref, y_ref = _hooked_reference(model, block, arch, ids)
    with H.Harvester(model, LAYER) as harvester:   # a transcoder needs no activation: the rest works
        x, y = harvester.harvest(ids)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    _check_identity_splice(model, block, arch, ids, clean, x, y)


def test_a_config_naming_another_activation_than_the_mlp_applies_is_refused():
    model = build("llama")
    model.config.hidden_act = "gelu"   # edited after the MLP was built with SiLU
    dims = H.model_dims(model, LAYER)
    assert dims["activation"] is None and dims["model_activation"] == "gelu"
    assert "the config names the activation 'gelu', but the MLP applies SiLUActivation" in \
        adapt(model).mlp(LAYER).activation()[1]


@pytest.mark.parametrize("model_type,config,message", REFUSED, ids=[f"{r[0]}{'-' if r[1] else ''}"
                                                                     f"{'-'.join(r[1])}" for r in REFUSED])
def test_an_mlp_that_cannot_be_replaced_is_refused_saying_why(model_type, config, message):
    model = build(model_type, config)
    for call in (lambda: H.model_dims(model, LAYER), lambda: H.find_mlp(model, LAYER),
                 lambda: H.Harvester(model, LAYER), lambda: splice_layer(model, LAYER, nn.Identity())):
        with pytest.raises(ValueError, match=message):
            call()


def test_an_mlp_shared_by_several_blocks_is_refused():
    model = build("llama")
    model.model.layers[0].mlp = model.model.layers[LAYER].mlp
    with pytest.raises(ValueError, match=r"the MLP at model\.layers\.1\.mlp is shared with block\(s\) \[0\]: "
                                         "replacing it would replace theirs too"):
        splice_layer(model, LAYER, nn.Identity())


def test_transformers_activation_names_map_exactly_or_are_refused():
    from transformers.activations import ACT2CLS, ACT2FN
    t = torch.randn(8192, generator=torch.Generator().manual_seed(4)) * 8
    mapped = []
    for name in ACT2CLS:
        try:
            key = H.map_activation(name)
        except ValueError as err:
            assert repr(name) in str(err)
            continue
        mapped.append(name)
        assert torch.equal(ACTIVATIONS[key](t), ACT2FN[name](t.clone())), name
    assert {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu2", "silu"} <= set(mapped)
    for near in ("gelu_python", "gelu_python_tanh", "gelu_accurate", "gelu_10"):   # close, never equal
        with pytest.raises(ValueError, match=re.escape(repr(near))):
            H.map_activation(near)


# ---- every causal-LM architecture of transformers ------------------------------------------------

def _causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# Causal-LM types not built here, and why.
NOT_BUILT = {
    "blt": "a byte-latent model whose sub-configs keep their full size (gigabytes)",
    "dbrx": "its default config does not build in this transformers (DbrxAttentionConfig has no rope_theta)",
    "cohere_compass_text": "its default config does not run in this transformers (no rope parameters for "
                           "'full_attention')",
    "dots3_note": "a multimodal model whose vision adapter keeps the full text width (dots3_note_text is built)",
    "gemma3n": "its vision tower needs timm (gemma3n_text is built)",
    "gemma4_assistant": "a draft model for assisted decoding; its config refuses these sizes",
    "gemma4_unified_assistant": "a draft model for assisted decoding; its config refuses these sizes",
    "musicgen": "a text-to-audio decoder: its input ids are audio codebook tokens",
    "musicgen_melody": "a text-to-audio decoder: its input ids are audio codebook tokens",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _causal_lm_types())
def test_every_causal_lm_architecture_is_exact_or_refused(model_type):
    if model_type in NOT_BUILT:
        pytest.skip(NOT_BUILT[model_type])
    ids = _ids()
    model = build(model_type)
    clean = _logits(model, ids)
    try:
        site = adapt(model).mlp(LAYER)
    except ValueError as err:
        assert re.search(r"mixture of experts|no MLP module named|not a dense MLP|linear map|computes its output "
                         r"map|does not run|is not the output|is shared with|several times|holds weights|several "
                         r"activations|maps width", str(err)), str(err)
        return
    key, why = site.activation()
    if key is not None:
        t = torch.randn(8192, generator=torch.Generator().manual_seed(2)) * 8
        assert torch.equal(ACTIVATIONS[key](t), site.act(t.clone()))
    else:
        assert why
    with H.Harvester(model, LAYER) as harvester:
        x, y = harvester.harvest(ids)
    recompute = Recompute([H.find_mlp(model, LAYER)[2]])
    with spliced(model, LAYER, recompute):
        assert torch.equal(_logits(model, ids), clean)
    (seen_x, seen_y), = recompute.seen
    assert torch.equal(seen_x.reshape(x.shape), x) and torch.equal(seen_y.reshape(y.shape), y)
    assert torch.equal(_logits(model, ids), clean)
