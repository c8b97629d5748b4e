"""sparsify adapter: mxd_fast.gather_combine as the sparse decoder of EleutherAI sparsify's SparseCoder.

sparsify's SparseCoder decodes (in decode(), and for the AuxK loss in forward()) through the module-level
function `decoder_impl(top_indices, top_acts, W_dec)` of sparsify.sparse_coder, called with
W_dec = self.W_dec.mT ([d_out, num_latents]). `decoder_impl` below has that signature and meaning;
`use_mxd_fast_decoder()` puts it in place:

    with use_mxd_fast_decoder():     # undone on exit
        out = sparse_coder(x, dead_mask=dead_mask)

or, for the rest of the process, `use_mxd_fast_decoder()` as a plain call (`.restore()` undoes it).
"""
from __future__ import annotations

from torch import Tensor

try:
    import sparsify.sparse_coder as _sparse_coder
    import sparsify.utils as _sparsify_utils
except ImportError as err:   # the adapter is optional; mxd_fast itself never imports it
    raise ImportError("mxd_fast.integrations.sparsify needs EleutherAI's sparsify (pip install eai-sparsify)") from err

from ..ops.gather_combine import gather_combine

_MODULES = (_sparse_coder, _sparsify_utils)   # sparse_coder imported the name from utils: both hold it


def decoder_impl(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """sparsify's sparse decoder, by mxd_fast.gather_combine: y[..., :] = sum_j top_acts[..., j] *
    W_dec[:, top_indices[..., j]]. W_dec: [d_out, num_latents] (SparseCoder passes self.W_dec.mT);
    top_acts, top_indices: [..., k], top_acts in W_dec's dtype, top_indices int64 or int32 in
    [0, num_latents). Differentiable in W_dec and top_acts, as sparsify's eager and Triton decoders are."""
    for name, t in (("top_indices", top_indices), ("top_acts", top_acts), ("W_dec", W_dec)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [d_out, num_latents] (SparseCoder passes W_dec.mT), got shape "
                         f"{tuple(W_dec.shape)}")
    if top_acts.shape != top_indices.shape:
        raise ValueError(f"top_acts and top_indices must have the same shape, got {tuple(top_acts.shape)} and "
                         f"{tuple(top_indices.shape)}")
    if top_acts.dtype != W_dec.dtype:
        raise TypeError(f"top_acts must have W_dec's dtype {W_dec.dtype}, got {top_acts.dtype}")
    try:
        return gather_combine(W_dec.mT, top_acts, top_indices)
    except IndexError as err:
        raise IndexError(f"top_indices must lie in [0, num_latents = {W_dec.shape[1]}): {err}") from err


class use_mxd_fast_decoder:
    """Makes sparsify's SparseCoder decode with mxd_fast's `decoder_impl`. As a context manager the swap is
    undone on exit; as a plain call it lasts until `.restore()`. Swaps nest: undo them in reverse order."""

    def __init__(self):
        self._previous = tuple(module.decoder_impl for module in _MODULES)
        for module in _MODULES:
            module.decoder_impl = decoder_impl
        self._active = True

    def restore(self) -> None:
        """Puts back the decoders that were in place before this swap (once; later calls do nothing)."""
        if not self._active:
            return
        for module in _MODULES:
            if module.decoder_impl is not decoder_impl:
                raise RuntimeError(f"{module.__name__}.decoder_impl was replaced after this swap "
                                   f"(by {module.decoder_impl!r}); undo that first")
        for module, previous in zip(_MODULES, self._previous):
            module.decoder_impl = previous
        self._active = False

    def __enter__(self) -> "use_mxd_fast_decoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
