"""The language models the trainer reads and splices, behind one interface: a transformers causal LM, a
TransformerLens HookedTransformer, or an nnsight LanguageModel (its transformers model, replaced through
nnsight's module tree so that its traces see the change).

`adapt(model)` gives a ModelAdapter: the number of blocks, the longest context, a forward pass that returns
logits, and `mlp(layer)`, an MLPSite: where the MLP of a block reads its input and writes its output, how it
is replaced, and its widths and activation. Two kinds of MLP are handled:

- one module maps the MLP's input to its output (`mlp` of Llama, GPT-2, GPT-NeoX, Gemma, Phi, ...), and is
  replaced whole;
- the MLP is three parts (input map, activation, output map) inside a module that does more: OPT's and
  BART's decoder layers (fc1, activation_fn, fc2, then the residual add), BERT's intermediate/output pair,
  and BLOOM's and MPT's MLPs, which add the residual themselves. The input and activation are replaced by
  pass-throughs and the output map by the new layer, so the block computes exactly what it did around it.

Every refusal (a mixture-of-experts block, no MLP, an MLP that is not input map -> activation -> output map)
is a ValueError saying why. An activation is mapped to mxd_fast.module.ACTIVATIONS only when it is known by
its class (or function) and computes the very same values on a probe tensor; otherwise it is refused by name.
Nothing here imports transformers, transformer_lens or nnsight: they are recognised once imported.
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
import sys
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..module import ACTIVATIONS

# The MLP's attribute on a block where it is not `mlp` (model_type -> attribute).
MLP_NAMES = {
    "mpt": "ffn", "ctrl": "ffn", "cpmant": "ffn", "prophetnet": "feed_forward", "jamba": "feed_forward",
    "bamba": "feed_forward", "falcon_h1": "feed_forward", "lfm2": "feed_forward", "lfm2_moe": "feed_forward",
    "lfm3": "feed_forward", "llama4": "feed_forward", "llama4_text": "feed_forward", "recurrent_gemma": "mlp_block",
    "granitemoe": "block_sparse_moe", "granitemoe_swa": "block_sparse_moe", "granitemoeshared": "block_sparse_moe",
    "granitemoehybrid": "block_sparse_moe", "nemotron_h": "mixer"}
# Model types that run each block several times in one forward pass: an MLP has no one (input, output) per token.
REUSED_BLOCKS = {"hrm_text": "its reasoning modules run their blocks several times per forward pass"}
BLOCK_LIST_NAMES = ("layers", "h", "layer", "blocks", "block")
CONFIG_ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation_function", "ffn_act_fn", "activation")
GATE_NAMES = ("gate_proj", "gate_up_proj", "w3", "wi_0", "gate")

# transformers.activations classes (and BLOOM's) whose forward is computed exactly as ACTIVATIONS[key].
_TRANSFORMERS_ACTIVATIONS = {"GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_new",
                             "FastGELUActivation": "gelu_fast", "QuickGELUActivation": "quick_gelu",
                             "ReLUSquaredActivation": "relu2", "SiLUActivation": "silu"}
_TORCH_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}
_TORCH_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid",
                    F.sigmoid: "sigmoid"}
_LENS_FUNCTIONS = {"gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu2": "relu2"}


def layer_index(layer) -> int:
    """layer as an int (numpy and torch integers too); TypeError for a float or a bool."""
    try:
        if isinstance(layer, bool):
            raise TypeError
        return operator.index(layer)
    except TypeError:
        raise TypeError(f"layer index must be an int, got {type(layer).__name__}") from None


# ---- activations ---------------------------------------------------------------------------

def _probe(device, dtype) -> Tensor:
    """Values an activation is compared on: a fine grid over [-40, 40], large values of both signs, zeros."""
    grid = torch.linspace(-40.0, 40.0, 16001, dtype=torch.float32)
    extremes = torch.tensor([0.0, -0.0, 1e3, -1e3, 1e4, -1e4, 3e4, -3e4], dtype=torch.float32)
    return torch.cat([grid, extremes]).to(device=device, dtype=dtype)


@torch.no_grad()
def _computes_same(act: Callable, key: str, device="cpu", dtype=torch.float32) -> bool:
    """Whether act and ACTIVATIONS[key] give bitwise the same values on the probe (fp32 and `dtype`)."""
    for d in {torch.float32, dtype}:
        x = _probe(device, d)
        if not torch.equal(act(x.clone()), ACTIVATIONS[key](x.clone())):
            return False
    return True


def _known_key(act) -> Optional[str]:
    """The ACTIVATIONS key `act` is by its class or function (before checking its values), or None."""
    if isinstance(act, functools.partial):
        tanh = act.func is F.gelu and not act.args and act.keywords == {"approximate": "tanh"}
        return "gelu_tanh" if tanh else None
    if not isinstance(act, nn.Module):
        module = getattr(act, "__module__", "") or ""
        if module.startswith("transformer_lens"):
            return _LENS_FUNCTIONS.get(getattr(act, "__name__", ""))
        return next((k for f, k in _TORCH_FUNCTIONS.items() if act is f), None)
    cls = type(act)
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if cls in _TORCH_ACTIVATIONS:
        return _TORCH_ACTIVATIONS[cls]
    if cls.__module__ == "transformers.activations":
        return _TRANSFORMERS_ACTIVATIONS.get(cls.__name__)
    if cls.__name__ == "BloomGelu" and cls.__module__.startswith("transformers.models.bloom"):
        return "gelu_bloom"
    return None


def _activation_name(act) -> str:
    if isinstance(getattr(act, "unmatched_name", None), str):
        return act.unmatched_name
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))


def identify_activation(act, label: Optional[str] = None, device="cpu",
                        dtype=torch.float32) -> tuple[Optional[str], Optional[str]]:
    """(key, None): the ACTIVATIONS key that computes exactly what `act` (the MLP's activation module or
    function) computes; or (None, why not). `label`: the activation's name (transformers' ACT2FN) in the
    model's config, when it has one: a config that names another function than the module computes is
    refused too."""
    name = _activation_name(act)
    if isinstance(act, nn.Module) and any(True for _ in act.parameters()):
        return None, f"the activation {name} has learned parameters; mxd_fast has no such activation"
    key = _known_key(act)
    if key is None:
        return None, f"mxd_fast has no activation that computes exactly what {name} computes"
    if not _computes_same(act, key, device, dtype):
        return None, f"{name} does not compute exactly what mxd_fast's {key!r} computes (a variant of it)"
    mismatch = _config_mismatch(act, label, device)
    return (None, mismatch) if mismatch else (key, None)


@torch.no_grad()
def _config_mismatch(act, label: Optional[str], device) -> Optional[str]:
    """Why the config's activation `label` is not what the MLP's `act` computes, if it is not."""
    acts = sys.modules.get("transformers.activations")
    if not isinstance(label, str) or acts is None or label not in getattr(acts, "ACT2CLS", {}):
        return None
    named = acts.ACT2FN[label]
    if any(True for _ in named.parameters()):
        return None
    x = _probe(device, torch.float32)
    if torch.equal(named(x.clone()), act(x.clone())):
        return None
    return (f"the config names the activation {label!r}, but the MLP applies {_activation_name(act)}, which "
            "computes something else (was the config edited after the model was built?)")


def _is_activation_module(module: nn.Module) -> bool:
    """Whether a child of an MLP is its activation (known, or an activation by its class's module or name)."""
    cls = type(module)
    return (_known_key(module) is not None
            or cls.__module__ in ("transformers.activations", "torch.nn.modules.activation")
            or re.search(r"(?i)gelu|relu|silu|swish|sigmoid|tanh|activation|^act", cls.__name__) is not None)


# ---- linear maps ---------------------------------------------------------------------------

def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of an nn.Linear (or subclass) or transformers' Conv1D; else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return int(module.nx), int(module.nf)
    return None


class Passthrough(nn.Module):
    """A part of an MLP taken out by a splice: its input passes on unchanged."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


class ComposedMLP(nn.Module):
    """An MLP that is three parts of a larger module (input map, activation, output map: the model's own
    modules, shared), run in sequence. splice_layer returns it for such an MLP; splicing it back restores
    the parts."""
    _is_mlp_replacement = True

    def __init__(self, first: nn.Module, act: nn.Module, last: nn.Module):
        super().__init__()
        self.first, self.act, self.last = first, act, last

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.last(self.act(self.first(x)))


# The ComposedMLP of an output map, held weakly both ways (a view alive somewhere is handed out again).
_COMPOSED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _composed(first: nn.Module, act: nn.Module, last: nn.Module) -> ComposedMLP:
    """The one ComposedMLP of these parts (so that find_mlp and splice_layer hand out the same module)."""
    ref = _COMPOSED.get(last)
    view = ref() if ref is not None else None
    if view is None or view.first is not first or view.act is not act:
        view = ComposedMLP(first, act, last)
        _COMPOSED[last] = weakref.ref(view)
    return view


# ---- one block's MLP -----------------------------------------------------------------------

class MLPSite:
    """The MLP of block `index`: either the module `owner.attr` (`parts` None), or the parts
    ((owner, attr) of its input map, activation and output map) of a larger module. d: the width of its
    input and output; hidden: the width its activation works on; glu: whether it multiplies the activation
    by a second linear map of its input (gate * up); act: its activation (a module or a function, None if
    it has none that can be told apart), act_label: the activation's name in the model's config."""

    def __init__(self, adapter: "ModelAdapter", index: int, where: str, d: int, hidden: int, glu: bool, act,
                 act_label: Optional[str] = None, slot: Optional[tuple] = None, parts: Optional[tuple] = None):
        self.adapter, self.index, self.where = adapter, index, where
        self.d, self.hidden, self.glu, self.act, self.act_label = d, hidden, glu, act, act_label
        self.slot, self.parts = slot, parts

    def _parts(self) -> list[nn.Module]:
        return [getattr(owner, attr) for owner, attr in self.parts]

    def is_replaced(self) -> bool:
        """Whether a splice put another module in the MLP's place (the parts kind: its input map is a
        pass-through)."""
        return self.parts is not None and isinstance(self._parts()[0], Passthrough)

    def module(self) -> nn.Module:
        """The module standing as the MLP now: the model's own (a ComposedMLP of its parts, for that kind),
        or what splice_layer put in its place."""
        if self.parts is None:
            return getattr(*self.slot)
        first, act, last = self._parts()
        return last if self.is_replaced() else _composed(first, act, last)

    def read_points(self) -> tuple[nn.Module, nn.Module]:
        """(the module whose input is the MLP's input, the module whose output is the MLP's output)."""
        if self.parts is None:
            mlp = getattr(*self.slot)
            return mlp, mlp
        parts = self._parts()
        return parts[0], parts[2]

    def replace(self, new: nn.Module) -> nn.Module:
        """Put `new` in the MLP's place (a ComposedMLP of this MLP's own parts puts them back); returns the
        module that stood there (see module())."""
        old = self.module()
        _remember(self, new)
        if self.parts is None:
            self.adapter.set_child(*self.slot, new)
            return old
        if isinstance(new, ComposedMLP):
            modules = (new.first, new.act, new.last)
        else:
            modules = (Passthrough(), Passthrough(), new)
        for (owner, attr), module in zip(self.parts, modules):
            self.adapter.set_child(owner, attr, module)
        return old

    def activation(self) -> tuple[Optional[str], Optional[str]]:
        """(ACTIVATIONS key, None), or (None, why the MLP's activation has no exact MxD form)."""
        if self.act is None:
            return None, (f"the MLP at {self.where} has no activation module or function attribute (it applies "
                          "its activation inline), so there is none to compare with mxd_fast's")
        label = self.act_label if self.adapter.kind != "transformer_lens" else None   # not an ACT2FN name
        return identify_activation(self.act, label, self.adapter.device(), self.adapter.dtype())

    def activation_label(self) -> str:
        """The activation's name: the config's, else its class's or function's."""
        return self.act_label if isinstance(self.act_label, str) else _activation_name(self.act)


# ---- the models --------------------------------------------------------------------------

class ModelAdapter:
    """What the trainer needs of a language model. `module` is the torch module that runs."""
    kind = "model"

    def __init__(self, model, module: nn.Module):
        self.model, self.module = model, module

    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def dtype(self) -> torch.dtype:
        p = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def num_layers(self) -> int:
        raise NotImplementedError

    def max_positions(self) -> Optional[int]:
        raise NotImplementedError

    def mlp(self, layer: int) -> MLPSite:
        raise NotImplementedError

    def forward(self, input_ids: Tensor, **kwargs):
        """The model's own output for token ids [batch, tokens] (on the model's device)."""
        raise NotImplementedError

    def logits_of(self, output) -> Tensor:
        """The logits [batch, tokens, vocab] in forward()'s output."""
        raise NotImplementedError

    def logits(self, input_ids: Tensor) -> Tensor:
        return self.logits_of(self.forward(input_ids))

    def set_child(self, owner: nn.Module, attr: str, module: nn.Module) -> None:
        setattr(owner, attr, module)

    def _check_layer(self, layer) -> int:
        layer = layer_index(layer)
        n = self.num_layers()
        if not 0 <= layer < n:
            raise ValueError(f"no layer {layer} in the model: it has {n} layers: 0 .. {n - 1}" if n else
                             f"no layer {layer}: the model has no blocks")
        return layer


class TransformersModel(ModelAdapter):
    """A transformers causal LM (PreTrainedModel with a config)."""
    kind = "transformers"

    def __init__(self, model, module: Optional[nn.Module] = None):
        super().__init__(model, module if module is not None else model)
        config = self.module.config
        self.config = config
        try:
            self.text_config = config.get_text_config()
        except (AttributeError, ValueError):   # no text config of its own, or several (a text-to-audio model)
            self.text_config = config
        self.model_type = getattr(self.text_config, "model_type", None) or getattr(config, "model_type", None)
        self.blocks_name, self.blocks = _find_blocks(self.module)

    def num_layers(self) -> int:
        if self.blocks is not None:
            return len(self.blocks)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(self.text_config, key, None)
            if isinstance(value, int):
                return value
        return 0

    def max_positions(self) -> Optional[int]:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.text_config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def forward(self, input_ids: Tensor, **kwargs):
        if _takes(self.module.forward, "use_cache"):
            kwargs.setdefault("use_cache", False)
        return self.module(input_ids=input_ids, **kwargs)

    def logits_of(self, output) -> Tensor:
        return output.logits if hasattr(output, "logits") else output[0]

    def mlp(self, layer) -> MLPSite:
        layer = layer_index(layer)
        name = MLP_NAMES.get(self.model_type, "mlp")
        if self.blocks is None or not 0 <= layer < len(self.blocks):
            n = self.num_layers()
            raise ValueError(f"no MLP module named '<blocks>.{layer}.{name}' in the model"
                             + (f" (it has {n} layers: 0 .. {n - 1})" if n else ""))
        block, where = self.blocks[layer], f"{self.blocks_name}.{layer}"
        if self.model_type in REUSED_BLOCKS:
            raise ValueError(f"{self.model_type}: {REUSED_BLOCKS[self.model_type]}, so the MLP at {where} has no one "
                             "input and output per token to harvest, and replacing it changes every pass")
        label = next((getattr(self.text_config, k) for k in CONFIG_ACTIVATION_KEYS
                      if isinstance(getattr(self.text_config, k, None), str)), None)
        if hasattr(block, name):
            site = _module_site(self, layer, block, name, f"{where}.{name}", label)
        elif all(hasattr(block, a) for a in ("fc1", "activation_fn", "fc2")):
            parts = ((block, "fc1"), (block, "activation_fn"), (block, "fc2"))
            site = _parts_site(self, layer, parts, f"{where}.{{fc1, activation_fn, fc2}}", label)
        elif _bert_parts(block) is not None:
            site = _parts_site(self, layer, _bert_parts(block), f"{where}.{{intermediate, output}}", label)
        else:
            children = ", ".join(n for n, _ in block.named_children())
            raise ValueError(f"no MLP module named '<blocks>.{layer}.{name}' in the model (block {where} has: "
                             f"{children})")
        _refuse_shared(self.blocks, layer, site)
        return site


def _bert_parts(block: nn.Module) -> Optional[tuple]:
    """BERT's MLP: intermediate.dense -> intermediate.intermediate_act_fn -> output.dense (then output adds the
    residual and normalises)."""
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    if all(hasattr(intermediate, a) for a in ("dense", "intermediate_act_fn")) and hasattr(output, "dense"):
        return (intermediate, "dense"), (intermediate, "intermediate_act_fn"), (output, "dense")
    return None


def _refuse_shared(blocks: nn.ModuleList, layer: int, site: MLPSite) -> None:
    """ValueError when the MLP's module is also part of other blocks (Zamba's shared transformer): replacing
    it would replace theirs too. A module a splice put there is not checked (it is taken out again)."""
    last = site.read_points()[1]
    if last in _REPLACED or site.is_replaced():
        return
    others = [i for i, block in enumerate(blocks) if i != layer and any(m is last for m in block.modules())]
    if others:
        raise ValueError(f"the MLP at {site.where} is shared with block(s) {others}: replacing it would replace "
                         "theirs too")


def _takes(function, name: str) -> bool:
    """Whether `function` takes the keyword argument `name` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _find_blocks(module: nn.Module) -> tuple[str, Optional[nn.ModuleList]]:
    """(dotted name, ModuleList) of the model's transformer blocks: the shallowest ModuleList named layers /
    h / layer / blocks / block, in the model's decoder (the language model of a multimodal model) if it has
    one there, else anywhere in the model."""
    get_decoder = getattr(module, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:   # a model without a separable decoder says so in its own way
        decoder = None
    names = {id(m): n for n, m in module.named_modules()}
    roots = [module]
    if isinstance(decoder, nn.Module) and decoder is not module and id(decoder) in names:
        roots.insert(0, decoder)
    for root in roots:
        prefix = names[id(root)] + "." if root is not module else ""
        best = None
        for name, child in root.named_modules():
            if isinstance(child, nn.ModuleList) and len(child) and name.rpartition(".")[2] in BLOCK_LIST_NAMES:
                rank = (name.count("."), len(name))
                if best is None or rank < best[0]:
                    best = (rank, prefix + name, child)
        if best is not None:
            return best[1], best[2]
    return "<blocks>", None


def _is_moe(module: nn.Module) -> bool:
    """A mixture-of-experts block: a child (by its name or class) is experts, a router or a top-k gating."""
    names = [n for n, _ in module.named_children()] + [type(c).__name__ for c in module.children()]
    return any(re.search(r"(?i)expert|router|gating|topk", n) for n in names)


def _refuse_moe(module: nn.Module, where: str) -> None:
    if _is_moe(module):
        raise ValueError(f"the MLP at {where} is a mixture of experts ({type(module).__name__}): an MxD layer "
                         "stands for one dense MLP, and replacing a routed block (or one of its experts) is not "
                         "supported")


# What stood in an MLP's place before a splice: the MLP's widths and activation, for the module put there.
_REPLACED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()
# The (input map, activation, output map) attributes of an MLP module that adds the residual itself.
_RESIDUAL_PARTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _site_facts(site: MLPSite) -> dict:
    return {"d": site.d, "hidden": site.hidden, "glu": site.glu, "act": site.act, "act_label": site.act_label}


def _remember(site: MLPSite, new: nn.Module) -> None:
    if not isinstance(new, ComposedMLP):
        _REPLACED[new] = _site_facts(site)


def _linear_children(module: nn.Module) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    return [(n, c, linear_shape(c)) for n, c in module.named_children() if linear_shape(c) is not None]


def _activation_of(module: nn.Module, where: str):
    """(attribute, activation) of an MLP module: its one activation child, else a function attribute."""
    found = [(n, c) for n, c in module.named_children() if _is_activation_module(c)]
    if len(found) > 1:
        raise ValueError(f"the MLP at {where} has several activations ({', '.join(n for n, _ in found)}): not "
                         "one input map -> activation -> output map")
    if found:
        return found[0]
    for attr in ("act", "act_fn", "activation", "activation_fn", "intermediate_act_fn"):
        value = vars(module).get(attr)
        if callable(value) and not isinstance(value, nn.Module):
            return attr, value
    return None, None


def _refuse_unknown_parts(module: nn.Module, where: str) -> None:
    """A dense MLP holds linear maps, one activation, dropout and norms; anything else with parameters
    (a convolution, a state-space mixer, weights of its own) is refused by name."""
    if any(True for _ in module.parameters(recurse=False)):
        raise ValueError(f"the module at {where} ({type(module).__name__}) holds weights of its own, not in "
                         "linear maps: not a dense MLP that mxd_fast can read")
    for name, child in module.named_children():
        has_weights = any(True for _ in child.parameters())
        if has_weights and linear_shape(child) is None and "norm" not in type(child).__name__.lower() \
                and not _is_activation_module(child):
            raise ValueError(f"the module at {where} ({type(module).__name__}) has {name} "
                             f"({type(child).__name__}): not a dense MLP of linear maps and an activation")


def _module_site(adapter, layer: int, owner: nn.Module, attr: str, where: str, label) -> MLPSite:
    """The site of an MLP that is the module owner.attr (or, when its forward adds the residual itself,
    BLOOM's and MPT's, of its three parts)."""
    mlp = getattr(owner, attr)
    if mlp in _REPLACED:
        return MLPSite(adapter, layer, where, slot=(owner, attr), **_REPLACED[mlp])
    if mlp in _RESIDUAL_PARTS:   # BLOOM's or MPT's MLP, read before
        return _parts_site(adapter, layer, tuple((mlp, n) for n in _RESIDUAL_PARTS[mlp]), where, label)
    _refuse_moe(mlp, where)
    _refuse_unknown_parts(mlp, where)
    linears = _linear_children(mlp)
    act_attr, act = _activation_of(mlp, where)
    if len(linears) < 2:
        raise ValueError(f"the module at {where} ({type(mlp).__name__}) has {len(linears)} linear map(s): not an "
                         "MLP (input map -> activation -> output map)")
    (_, _, (d_in, first_out)), (_, last, (hidden, d)) = linears[0], linears[-1]
    if d_in != d:
        raise ValueError(f"the MLP at {where} maps width {d_in} to width {d}: mxd_fast replaces an MLP whose "
                         "input and output have the model's width")
    glu = any(hasattr(mlp, n) for n in GATE_NAMES) or (len(linears) == 2 and first_out == 2 * hidden)
    if _takes_residual(mlp):
        if len(linears) != 2 or act_attr is None or not isinstance(act, nn.Module):
            raise ValueError(f"the MLP at {where} ({type(mlp).__name__}) adds the residual itself and is not "
                             "input map -> activation -> output map")
        parts = ((mlp, linears[0][0]), (mlp, act_attr), (mlp, linears[1][0]))
        _check_once(mlp, where, lambda: _residual_check(mlp, _composed(*(getattr(o, a) for o, a in parts)), d))
        _RESIDUAL_PARTS[mlp] = tuple(a for _, a in parts)
        return MLPSite(adapter, layer, where, d, hidden, glu, act, label, parts=parts)
    _check_once(mlp, where, lambda: _output_check(mlp, last, d))
    sparsity = getattr(mlp, "activation_sparsity", 0.0)
    if isinstance(sparsity, float) and sparsity > 0:   # Gemma 3n: a top-k by statistics before the activation
        act = _Unmatched(f"{_activation_name(act)} of pre-activations sparsified to their top "
                         f"{1 - sparsity:.0%} (activation_sparsity = {sparsity})")
    return MLPSite(adapter, layer, where, d, hidden, glu, act, label, slot=(owner, attr))


def _parts_site(adapter, layer: int, parts: tuple, where: str, label) -> MLPSite:
    """The site of an MLP made of parts of a larger module: input map, activation, output map."""
    first, act, last = (getattr(owner, attr) for owner, attr in parts)
    if isinstance(first, Passthrough) and last in _REPLACED:
        return MLPSite(adapter, layer, where, parts=parts, **_REPLACED[last])
    shapes = linear_shape(first), linear_shape(last)
    if None in shapes or shapes[0][1] != shapes[1][0] or shapes[0][0] != shapes[1][1]:
        raise ValueError(f"the MLP at {where} is not two linear maps d -> hidden -> d around its activation")
    (d, hidden) = shapes[0]
    return MLPSite(adapter, layer, where, d, hidden, False, act, label, parts=parts)


def _takes_residual(module: nn.Module) -> bool:
    try:
        return "residual" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_once(mlp: nn.Module, where: str, check: Callable[[], Optional[str]]) -> None:
    """Run check() once per MLP module (it runs the MLP on a few random rows); ValueError with its reason."""
    if mlp not in _CHECKED:
        _CHECKED[mlp] = check()
    if _CHECKED[mlp] is not None:
        raise ValueError(f"the MLP at {where} ({type(mlp).__name__}): {_CHECKED[mlp]}")


def _random_rows(module: nn.Module, d: int) -> Tensor:
    p = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, d, generator=generator).to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def _in_eval(module: nn.Module, run: Callable[[], Tensor]):
    """run() with every submodule of `module` in eval mode (dropout off), their modes restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        return run()
    finally:
        for m, training in modes:
            m.training = training


def _output_check(mlp: nn.Module, last: nn.Module, d: int) -> Optional[str]:
    """None if mlp(x) is exactly the output of its last linear map `last`, else why not."""
    seen = []
    handle = last.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        x = _random_rows(mlp, d)
        out = _in_eval(mlp, lambda: mlp(x))
    except Exception as err:   # a forward that needs more than the MLP's input
        return f"its forward does not run on the MLP's input alone ({type(err).__name__}: {err})"
    finally:
        handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    if len(seen) != 1 or not isinstance(out, Tensor) or not torch.equal(out, seen[0]):
        return ("its output is not the output of its last linear map (it adds, scales or normalises after it, "
                "or calls it more than once)")
    return None


def _residual_check(mlp: nn.Module, composed: ComposedMLP, d: int) -> Optional[str]:
    """None if mlp(x, residual = 0) is exactly output_map(activation(input_map(x))), else why not."""
    x = _random_rows(mlp, d)
    try:
        got = _in_eval(mlp, lambda: mlp(x, torch.zeros_like(x)))
    except Exception as err:
        return f"its forward does not run on (input, residual) ({type(err).__name__}: {err})"
    if not torch.equal(got, _in_eval(mlp, lambda: composed(x))):
        return ("it does not compute output map(activation(input map(x))) + residual (BLOOM with "
                "pretraining_tp > 1 and slow_but_exact computes its output map in slices)")
    return None


class LensModel(ModelAdapter):
    """A TransformerLens HookedTransformer: block i's MLP is blocks[i].mlp (its input is what ln2 hands it,
    its output what hook_mlp_out then sees); widths and activation from its cfg."""
    kind = "transformer_lens"

    def __init__(self, model):
        super().__init__(model, model)
        self.cfg = model.cfg

    def num_layers(self) -> int:
        return int(self.cfg.n_layers)

    def max_positions(self) -> Optional[int]:
        return int(self.cfg.n_ctx) if self.cfg.n_ctx else None

    def forward(self, input_ids: Tensor, **kwargs):
        return self.module(input_ids, return_type="logits", **kwargs)

    def logits_of(self, output) -> Tensor:
        return output

    def set_child(self, owner: nn.Module, attr: str, module: nn.Module) -> None:
        setattr(owner, attr, module)
        self.module.setup()   # its hook_dict and mod_dict list the modules that run now

    def mlp(self, layer) -> MLPSite:
        layer = self._check_layer(layer)
        block, where = self.module.blocks[layer], f"blocks.{layer}.mlp"
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise ValueError(f"block {layer} of this HookedTransformer has no MLP (cfg.attn_only = "
                             f"{self.cfg.attn_only})")
        if mlp in _REPLACED:
            return MLPSite(self, layer, where, slot=(block, "mlp"), **_REPLACED[mlp])
        _refuse_moe(mlp, where)
        act = getattr(mlp, "act_fn", None)
        if self.cfg.is_layer_norm_activation():
            act = _Unmatched(f"{self.cfg.act_fn} (the activation followed by a LayerNorm inside the MLP)")
        return MLPSite(self, layer, where, int(self.cfg.d_model), int(self.cfg.d_mlp), bool(self.cfg.gated_mlp),
                       act, self.cfg.act_fn, slot=(block, "mlp"))


class _Unmatched(nn.Module):
    """Stands for an activation mxd_fast cannot reproduce, under its name."""

    def __init__(self, name: str):
        super().__init__()
        self.unmatched_name = name

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"{self.unmatched_name} is not run here")


class NNsightModel(TransformersModel):
    """An nnsight LanguageModel: its transformers model, with modules replaced through nnsight's module tree
    (its envoys), so that a trace sees the module that runs."""
    kind = "nnsight"

    def __init__(self, model):
        super().__init__(model, model._module)

    def set_child(self, owner: nn.Module, attr: str, module: nn.Module) -> None:
        envoy = self.model
        path = next(name for name, m in self.module.named_modules() if m is owner)
        for part in filter(None, path.split(".")):
            envoy = getattr(envoy, part)
        setattr(envoy, attr, module)


def adapt(model) -> ModelAdapter:
    """The adapter of a transformers causal LM, a TransformerLens HookedTransformer or an nnsight
    LanguageModel (wrapping a transformers model)."""
    if isinstance(model, ModelAdapter):
        return model
    lens = sys.modules.get("transformer_lens")
    if lens is not None and isinstance(model, lens.HookedTransformer):
        return LensModel(model)
    envoy = sys.modules.get("nnsight.intervention.envoy")
    if envoy is not None and isinstance(model, envoy.Envoy):
        if not isinstance(getattr(model, "_module", None), nn.Module) or not hasattr(model._module, "config"):
            raise TypeError(f"model: an nnsight {type(model).__name__} wrapping a transformers model is needed, "
                            f"this one wraps {type(getattr(model, '_module', None)).__name__}")
        return NNsightModel(model)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return TransformersModel(model)
    raise TypeError(f"model must be a transformers causal LM, a TransformerLens HookedTransformer or an nnsight "
                    f"LanguageModel, got {type(model).__name__}")
