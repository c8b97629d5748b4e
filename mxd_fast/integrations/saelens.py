"""SAELens adapter: a trained MxD as a SAELens SAE, and a TopKTranscoder in SAELens's built-in format.

Importing this module registers the "mxd" architecture with SAELens, so that `SAE.load_from_disk` reads
folders written by `save_for_saelens`. An MxD is a transcoder: it reads the MLP's input hook
(`metadata.hook_name`) and writes the MLP's output hook (`metadata.hook_name_out`), as SAELens 6 models
transcoders, and HookedSAETransformer splices it in with `run_with_saes` / `run_with_cache_with_saes`.
Its feature activations are the N expert coefficients, dense [..., N].

Unlike an SAE, an MxD's output depends on its input through z = phi(x E + b_e), not on the feature
activations alone: `MxDSAE.decode(feature_acts)` decodes with the input of the encode() call just before
it (the order every SAELens code path uses: HookedSAETransformer, SAE.forward, the evals), and
`decode_with_input(x, feature_acts)` takes the input explicitly.

SAELens 6 trains autoencoders only (its training step compares decode(encode(x)) with x at one hook), so
no training class is registered: train with `python -m mxd_fast.train` and convert.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

try:
    from sae_lens import SAE, SAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import dtype_to_str
except ImportError as err:   # the adapter is optional; mxd_fast itself never imports it
    raise ImportError("mxd_fast.integrations.saelens needs SAELens 6 (pip install sae-lens)") from err

from ..module import ACTIVATIONS, MxD
from ..transcoder import TopKTranscoder

ARCHITECTURE = "mxd"

# SAELens parameter name -> (MxD attribute path, transposed): SAELens multiplies x @ W, nn.Linear x @ W.T
_MXD_PARAMETERS = {
    "W_enc": ("gate.weight", True), "b_enc": ("gate.bias", False),
    "W_dec": ("experts", False), "b_dec": ("bias", False),
    "W_hidden": ("encoder.weight", True), "b_hidden": ("encoder.bias", False),
    "W_hidden_dec": ("decoder", False),
    "W_glu": ("glu.weight", True), "b_glu": ("glu.bias", False),
    "W_skip": ("skip.weight", False),
}
_TOPK_PARAMETERS = {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                    "W_dec": ("decoder", False), "b_dec": ("bias", False)}


def _positive(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass
class MxDSAEConfig(SAEConfig):
    """An MxD layer's shape for SAELens: d_sae is the number of experts N (the feature activations)."""

    d_out: int = 0
    d_hidden: int = 0
    k: int = 1
    activation: str = "gelu"
    glu: bool = False
    skip: bool = False
    apply_b_dec_to_input: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_in", "d_sae", "d_out", "d_hidden", "k"):
            _positive(self, name)
        if self.k > self.d_sae:
            raise ValueError(f"k must satisfy 1 <= k <= d_sae = {self.d_sae} (the number of experts), got {self.k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("glu", "skip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.apply_b_dec_to_input:   # b_dec lives in the output space
            raise ValueError("apply_b_dec_to_input must be False for an MxD (a transcoder)")
        if self.normalize_activations != "none":
            raise ValueError(f"normalize_activations must be 'none' for an MxD, got {self.normalize_activations!r}: "
                             "fold input and output scales into the layer (mxd_fast.train.fold_scales) instead")
        if self.reshape_activations != "none":
            raise ValueError(f"reshape_activations must be 'none' for an MxD, got {self.reshape_activations!r}")


class MxDSAE(SAE[MxDSAEConfig]):
    """An MxD layer in SAELens: y = (a W_dec) * (z W_hidden_dec) + b_dec (+ x W_skip^T), with feature
    activations a = TopK(relu(x W_enc + b_enc)) (dense, [..., N]) and hidden state
    z = phi(x W_hidden + b_hidden) (times x W_glu + b_glu in the GLU variant)."""

    W_hidden: nn.Parameter
    b_hidden: nn.Parameter
    W_hidden_dec: nn.Parameter

    def __init__(self, cfg: MxDSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._pending_input: Optional[Tensor] = None   # set by encode(), taken by the decode() after it

    def initialize_weights(self) -> None:
        """Parameters shaped from the config, initialised as a new mxd_fast.MxD is (left empty on meta,
        where SAE.load_from_disk assigns the saved ones)."""
        c = self.cfg
        shapes = {"W_enc": (c.d_in, c.d_sae), "b_enc": (c.d_sae,), "W_dec": (c.d_sae, c.d_out), "b_dec": (c.d_out,),
                  "W_hidden": (c.d_in, c.d_hidden), "b_hidden": (c.d_hidden,), "W_hidden_dec": (c.d_hidden, c.d_out)}
        if c.glu:
            shapes.update(W_glu=(c.d_in, c.d_hidden), b_glu=(c.d_hidden,))
        if c.skip:
            shapes["W_skip"] = (c.d_out, c.d_in)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=self.dtype, device=self.device)))
        if self.device.type != "meta":
            fresh = MxD(c.d_in, c.d_hidden, c.d_out, c.d_sae, c.k, c.activation, c.glu, c.skip,
                        device=self.device, dtype=self.dtype)
            _copy_parameters(self, fresh, _MXD_PARAMETERS)

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        """The input in the SAE's dtype, through hook_sae_input (no b_dec: it is an output-space bias)."""
        return self.hook_sae_input(self._checked_input(sae_in))

    def _checked_input(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"x must have last dimension d_in = {self.cfg.d_in}, got shape {tuple(x.shape)}")
        return x.to(self.dtype)

    def hidden(self, sae_in: Tensor) -> Tensor:
        """z = phi(x W_hidden + b_hidden), times (x W_glu + b_glu) in the GLU variant."""
        z = ACTIVATIONS[self.cfg.activation](sae_in @ self.W_hidden + self.b_hidden)
        return z * (sae_in @ self.W_glu + self.b_glu) if self.cfg.glu else z

    def encode(self, x: Tensor) -> Tensor:
        """The dense [..., N] expert coefficients: the k largest of relu(x W_enc + b_enc), zero elsewhere.
        Keeps the input for the decode() call that follows."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        values, indices = torch.relu(hidden_pre).topk(self.cfg.k, dim=-1)
        feature_acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values)
        self._pending_input = sae_in
        return self.hook_sae_acts_post(feature_acts)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """The output for `feature_acts` (possibly edited) and the input of the encode() call just before."""
        sae_in, self._pending_input = self._pending_input, None
        if sae_in is None:
            raise RuntimeError("MxDSAE.decode(feature_acts) needs the input of the encode() call whose feature "
                               "activations it decodes (an MxD's output depends on its input through "
                               "z = phi(x E + b_e), not on the expert coefficients alone): call encode(x) just "
                               "before decode(), or use decode_with_input(x, feature_acts)")
        return self._decode(sae_in, feature_acts)

    def decode_with_input(self, x: Tensor, feature_acts: Tensor) -> Tensor:
        """The output for input x and feature activations `feature_acts` (hook_sae_input does not fire)."""
        return self._decode(self._checked_input(x), feature_acts)

    def _decode(self, sae_in: Tensor, feature_acts) -> Tensor:
        if not isinstance(feature_acts, Tensor):
            raise TypeError(f"feature_acts must be a torch.Tensor, got {type(feature_acts).__name__}")
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        if tuple(feature_acts.shape) != (*sae_in.shape[:-1], self.cfg.d_sae):
            raise ValueError(f"feature_acts must have shape {(*sae_in.shape[:-1], self.cfg.d_sae)} (the input's "
                             f"leading dimensions, then d_sae = {self.cfg.d_sae}), got {tuple(feature_acts.shape)}")
        # Dense (a W_dec): its gradient reaches every coefficient, the inactive ones too.
        y = (feature_acts.to(self.dtype) @ self.W_dec) * (self.hidden(sae_in) @ self.W_hidden_dec) + self.b_dec
        if self.cfg.skip:
            y = y + sae_in @ self.W_skip.T
        return self.hook_sae_recons(y)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_error_term:
            raise ValueError("use_error_term: a transcoder's error term needs the MLP's true output, which "
                             "forward(x) never sees; attach with HookedSAETransformer.add_sae(sae, "
                             "use_error_term=True) (or run_with_saes(..., use_error_term=True)) instead")
        return self.hook_sae_output(self.decode(self.encode(x)))

    def forward_with_activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, feature activations)."""
        feature_acts = self.encode(x)
        return self.decode(feature_acts), feature_acts

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("fold_W_dec_norm: moving the expert norms into the gate would change which k "
                                  "experts the top-k selects, and the experts are unit-norm already")

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        raise NotImplementedError("fold_activation_norm_scaling_factor: an MxD needs its input and output scales "
                                  "folded into the gate, encoder and decoder; use mxd_fast.train.fold_scales on "
                                  "the mxd_fast layer, then to_saelens")

    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor) -> None:
        raise NotImplementedError("fold_activation_whitening is not defined for an MxD (a transcoder)")


def _register() -> None:
    """Registers "mxd" with SAELens; a re-import of this module replaces its own earlier registration."""
    existing = SAE_CLASS_REGISTRY.get(ARCHITECTURE)
    if existing is None:
        register_sae_class(ARCHITECTURE, MxDSAE, MxDSAEConfig)
    elif existing[0].__module__ == __name__ and existing[0].__qualname__ == MxDSAE.__qualname__:
        SAE_CLASS_REGISTRY[ARCHITECTURE] = (MxDSAE, MxDSAEConfig)
    else:
        raise RuntimeError(f"SAELens already has an architecture named {ARCHITECTURE!r} "
                           f"({existing[0].__module__}.{existing[0].__qualname__}); cannot register MxDSAE")


_register()


# ---- conversion ------------------------------------------------------------------------------

def _attribute(module: nn.Module, path: str) -> Optional[Tensor]:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@torch.no_grad()
def _copy_parameters(sae: nn.Module, layer: nn.Module, names: dict) -> None:
    """Copies the layer's parameters into the SAE's namesakes (those both have)."""
    for sae_name, (path, transposed) in names.items():
        source, target = _attribute(layer, path), getattr(sae, sae_name, None)
        if source is not None and target is not None:
            target.copy_(source.T if transposed else source)


def _sae_dtype(dtype, default: torch.dtype) -> str:
    dtype = default if dtype is None else dtype
    try:
        return dtype_to_str(dtype)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"dtype must be one of torch.float32, float64, float16, bfloat16, got {dtype!r}") from None


def _metadata(hook_name_in: str, hook_name_out: str, model, model_name, metadata) -> SAEMetadata:
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    metadata = dict(metadata or {})
    for key in ("hook_name", "hook_name_out", "hook_head_index"):
        if key in metadata:
            raise ValueError(f"metadata must not set {key!r}: the hooks are hook_name_in and hook_name_out, "
                             "and per-head hooks are not supported")
    if model_name is None and model is not None:
        model_name = getattr(getattr(model, "cfg", None), "model_name", None)
    if model_name is not None:
        metadata["model_name"] = model_name
    return SAEMetadata(hook_name=hook_name_in, hook_name_out=hook_name_out, hook_head_index=None, **metadata)


def _mxd_to_sae(layer: MxD, metadata: SAEMetadata, device, dtype) -> MxDSAE:
    cfg = MxDSAEConfig(d_in=layer.d_in, d_sae=layer.n_experts, d_out=layer.d_out, d_hidden=layer.d_hidden,
                       k=layer.k, activation=layer.activation, glu=layer.glu is not None,
                       skip=layer.skip is not None, dtype=dtype, device=device, metadata=metadata)
    sae = MxDSAE(cfg)
    _copy_parameters(sae, layer, _MXD_PARAMETERS)
    return sae


def _topk_to_sae(layer: TopKTranscoder, metadata: SAEMetadata, device, dtype) -> TopKSAE:
    if layer.skip is not None:
        raise ValueError("layer: a TopKTranscoder with skip=True has no built-in SAELens format (SAELens 6 has "
                         "TopK SAEs and ReLU/JumpReLU skip-transcoders, no TopK skip-transcoder)")
    if layer.d_in != layer.d_out:
        raise ValueError(f"layer has d_in = {layer.d_in} and d_out = {layer.d_out}: SAELens's built-in TopK "
                         "format (TopKSAE) needs d_in == d_out")
    cfg = TopKSAEConfig(d_in=layer.d_in, d_sae=layer.width, k=layer.k, rescale_acts_by_decoder_norm=False,
                        apply_b_dec_to_input=False, dtype=dtype, device=device, metadata=metadata)
    sae = TopKSAE(cfg)
    _copy_parameters(sae, layer, _TOPK_PARAMETERS)
    return sae


def _check_hook_name(arg: str, name) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{arg} must be a non-empty str (a TransformerLens hook name), got {name!r}")


def to_saelens(layer: nn.Module, hook_name_in: str, hook_name_out: str, *, model=None, model_name=None,
               metadata: Optional[dict] = None, device=None, dtype=None) -> SAE:
    """A SAELens SAE with the layer's weights: an MxD becomes an MxDSAE ("mxd"); a TopKTranscoder becomes
    SAELens's built-in TopKSAE ("topk") with metadata.hook_name_out set, which plain SAELens loads and
    splices in as a transcoder (it needs d_in == d_out and skip=False).

    hook_name_in / hook_name_out: the hooks the layer reads and writes, e.g. "blocks.3.ln2.hook_normalized"
    (or "blocks.3.mlp.hook_in" in a HookedSAETransformer) and "blocks.3.hook_mlp_out". Given `model` (a
    HookedTransformer), both must fire in its forward pass, in that order, with the layer's widths.
    metadata: more SAELens metadata (context_size, prepend_bos, ...). device, dtype: default the layer's.
    """
    _check_hook_name("hook_name_in", hook_name_in)
    _check_hook_name("hook_name_out", hook_name_out)
    if isinstance(layer, MxD):
        build = _mxd_to_sae
    elif isinstance(layer, TopKTranscoder):
        build = _topk_to_sae
    else:
        raise TypeError(f"layer must be an mxd_fast.MxD or mxd_fast.TopKTranscoder, got {type(layer).__name__}")
    hooked = [name or "the layer" for name, module in layer.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        raise ValueError(f"layer has forward hooks on {', '.join(hooked)}, which the SAELens SAE would not run: "
                         "remove them (and edit the SAE's features through its hook_sae_acts_post instead)")
    reference = next(layer.parameters())
    if model is not None:
        check_hooks(model, hook_name_in, hook_name_out, layer.d_in, layer.d_out)
    device = str(torch.device(reference.device if device is None else device))
    meta = _metadata(hook_name_in, hook_name_out, model, model_name, metadata)
    return build(layer, meta, device, _sae_dtype(dtype, reference.dtype))


def save_for_saelens(layer: nn.Module, folder, hook_name_in: str, hook_name_out: str, **kwargs) -> Path:
    """to_saelens(layer, hook_name_in, hook_name_out, **kwargs), written by SAELens's own save_model
    (cfg.json and sae_weights.safetensors) into `folder`, which `SAE.load_from_disk(folder)` reads back
    (for an MxD, after `import mxd_fast.integrations.saelens`). Returns the folder."""
    to_saelens(layer, hook_name_in, hook_name_out, **kwargs).save_model(folder)
    return Path(folder)


def from_saelens(sae: SAE) -> nn.Module:
    """The mxd_fast layer of an SAE to_saelens made (or SAE.load_from_disk read back): an MxD from an
    MxDSAE, a TopKTranscoder from a TopKSAE without input bias, decoder-norm rescaling or normalisation."""
    parameter = sae.W_enc
    factory = {"device": parameter.device, "dtype": parameter.dtype}
    c = sae.cfg
    if isinstance(sae, MxDSAE):
        layer = MxD(c.d_in, c.d_hidden, c.d_out, c.d_sae, c.k, c.activation, c.glu, c.skip, **factory)
        names = _MXD_PARAMETERS
    elif type(sae) is TopKSAE:
        for flag, value in (("apply_b_dec_to_input", c.apply_b_dec_to_input),
                            ("rescale_acts_by_decoder_norm", c.rescale_acts_by_decoder_norm)):
            if value:
                raise ValueError(f"sae.cfg.{flag} = True has no TopKTranscoder equivalent here")
        if c.normalize_activations != "none" or c.reshape_activations != "none":
            raise ValueError("sae.cfg.normalize_activations and sae.cfg.reshape_activations must be 'none'")
        layer = TopKTranscoder(c.d_in, c.d_sae, sae.W_dec.shape[1], c.k, **factory)
        names = _TOPK_PARAMETERS
    else:
        raise TypeError(f"sae must be an MxDSAE or a TopKSAE, got {type(sae).__name__}")
    with torch.no_grad():
        for sae_name, (path, transposed) in names.items():
            target, source = _attribute(layer, path), getattr(sae, sae_name, None)
            if target is not None:
                target.copy_(source.T if transposed else source)
    return layer


# ---- checks against a model -----------------------------------------------------------------------

@torch.no_grad()
def _hook_shapes(model, names: list) -> dict:
    """{hook name: activation shape} of the hooks in `names` that fire on a one-token input, in the order
    they fire."""
    device = next(model.parameters()).device
    tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
    _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None, return_cache_object=False)
    return {name: tuple(act.shape) for name, act in cache.items()}


def check_hooks(model, hook_name_in: str, hook_name_out: str, d_in: int, d_out: int) -> None:
    """ValueError unless both hooks exist in the TransformerLens model, fire in a forward pass (the input
    first), and carry [batch, pos, d_in] and [batch, pos, d_out] activations. HookedSAETransformer would
    otherwise skip a missing hook with only a log line, or use a stale or absent input."""
    _check_hook_name("hook_name_in", hook_name_in)
    _check_hook_name("hook_name_out", hook_name_out)
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, dict) or not callable(getattr(model, "run_with_cache", None)):
        raise TypeError(f"model must be a TransformerLens HookedTransformer, got {type(model).__name__}")
    for arg, name in (("hook_name_in", hook_name_in), ("hook_name_out", hook_name_out)):
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3)
            raise ValueError(f"{arg} = {name!r} is not a hook point of the model"
                             + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    shapes = _hook_shapes(model, [hook_name_in, hook_name_out])
    for arg, name, width_name, width in (("hook_name_in", hook_name_in, "d_in", d_in),
                                         ("hook_name_out", hook_name_out, "d_out", d_out)):
        if name not in shapes:
            raise ValueError(f"{arg} = {name!r} never fires in the model's forward pass (is the option that "
                             "enables it, e.g. use_hook_mlp_in, off?)")
        if len(shapes[name]) != 3:
            raise ValueError(f"{arg} = {name!r} carries activations of shape {shapes[name]}; only "
                             "[batch, pos, d] hooks are supported (no per-head hooks)")
        if shapes[name][-1] != width:
            raise ValueError(f"the layer has {width_name} = {width}, but {arg} = {name!r} carries activations "
                             f"{shapes[name][-1]} wide")
    order = list(shapes)
    if hook_name_in != hook_name_out and order.index(hook_name_in) > order.index(hook_name_out):
        raise ValueError(f"hook_name_in = {hook_name_in!r} fires after hook_name_out = {hook_name_out!r}: a "
                         "transcoder's input must be computed before the output it replaces")


def check_sae_hooks(sae: SAE, model) -> None:
    """check_hooks for an SAE's metadata.hook_name and hook_name_out (hook_name when unset)."""
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a SAELens SAE, got {type(sae).__name__}")
    hook_in = sae.cfg.metadata.hook_name
    hook_out = sae.cfg.metadata.hook_name_out or hook_in
    check_hooks(model, hook_in, hook_out, sae.cfg.d_in, sae.W_dec.shape[1])


# ---- evaluation ------------------------------------------------------------------------------

# run_evals metrics computed by comparing decode(encode(x)) with x at metadata.hook_name, or by writing
# decode(encode(x)) back into that hook: right for an autoencoder, wrong for a transcoder.
_AUTOENCODER_ONLY_METRICS = ("compute_kl", "compute_ce_loss", "compute_l2_norms", "compute_variance_metrics")


def run_transcoder_evals(sae: SAE, activation_store, model, eval_config: EvalConfig,
                         activation_scaler: Optional[ActivationScaler] = None, **kwargs: Any):
    """SAELens's run_evals for a transcoder (metadata.hook_name_out set): the sparsity metrics (l0, l1) and
    feature density statistics, which read only the features of the input hook. Refuses, naming the
    eval_config field, the metrics SAELens computes at the input hook as if the SAE were an autoencoder
    (KL, CE loss, l2 norms, variance) and, for an MxD, the weight-based metrics (W_dec holds the expert
    vectors, not decoder directions). For the downstream loss of a transcoder, compare
    HookedSAETransformer.run_with_saes(tokens, saes=[sae], return_type="loss") with the clean model's."""
    if not isinstance(eval_config, EvalConfig):
        raise TypeError(f"eval_config must be a sae_lens.evals.EvalConfig, got {type(eval_config).__name__}")
    hook_out = sae.cfg.metadata.hook_name_out
    if hook_out is not None and hook_out != sae.cfg.metadata.hook_name:
        refused = [name for name in _AUTOENCODER_ONLY_METRICS if getattr(eval_config, name)]
        if isinstance(sae, MxDSAE) and eval_config.compute_featurewise_weight_based_metrics:
            refused.append("compute_featurewise_weight_based_metrics")
        if refused:
            raise ValueError(f"eval_config.{refused[0]} = True: SAELens computes "
                             f"{', '.join(refused)} for an autoencoder (at metadata.hook_name), which a "
                             f"transcoder writing {hook_out!r} is not; set them to False")
    return run_evals(sae, activation_store, model, activation_scaler or ActivationScaler(), eval_config, **kwargs)
