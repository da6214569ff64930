"""Attention through ``scaled_dot_product_attention`` with the model's additive bias folded into its mask.

Switch Transformers (T5's relative position bias) and NLLB-MoE have no SDPA path in transformers:
their eager attention materialises the ``[B, H, Q, K]`` scores, scales them, adds the position bias,
adds the mask and runs a separate softmax, five passes over the largest tensor of the layer. Both
models call attention through transformers' ``AttentionInterface`` with the bias as the keyword
``position_bias``, so a registered function can take over: it adds the bias and the mask once
(once per forward: every layer of a stack receives the same two tensors, and their sum is kept while
they live) and hands it to SDPA as its float mask, with the model's own scaling (1.0 for T5-style
attention). SDPA computes ``softmax(q k^T * scale + mask) v`` in one kernel with float32 softmax,
the eager path in the storage dtype, so outputs agree to rounding, not bit for bit.

The masks are the eager ones (``AttentionMaskInterface`` gets the eager mask builder under the same
name): additive float masks, exactly what the eager function adds. In training mode with dropout the
eager function of the model runs instead; attention weights are never returned (``None``), as with
transformers' own SDPA path.
"""

from __future__ import annotations

import sys
import warnings
import weakref

import torch
import torch.nn.functional as F

ATTENTION_NAME = "hf_moe_opt_sdpa"

# The last (position bias, mask) pair and their sum: the layers of one forward share both.
_LAST_BIAS: dict[str, object] = {}
_WARNED: set[str] = set()


_FUSED: list = []  # [sdpa_kernel, its fused backends]: looked up once, on the first CUDA call


def _fused_kernels():
    """``sdpa_kernel`` restricted to SDPA's fused backends (a context manager)."""
    if not _FUSED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        _FUSED.extend([sdpa_kernel, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]])
    return _FUSED[0](_FUSED[1])


def _sdpa(query, key, value, bias, scale) -> torch.Tensor:
    """SDPA restricted to its fused kernels on CUDA (the default choice can fall to the math kernel,
    which upcasts to float32 and materialises the scores: slower than the eager path); the math kernel
    with one warning where no fused kernel takes the inputs, and everywhere off CUDA."""
    if query.device.type == "cuda":
        try:
            with _fused_kernels():
                return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
        except RuntimeError as err:
            why = str(err).splitlines()[0]
            if why not in _WARNED:  # once per reason: ask SDPA again, this time keeping its explanations
                _WARNED.add(why)
                with warnings.catch_warnings(record=True) as caught, _fused_kernels():
                    warnings.simplefilter("always")
                    try:
                        F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
                    except RuntimeError:
                        pass
                reasons = "; ".join(str(w.message).split(" (Triggered")[0] for w in caught)
                warnings.warn(f"hf_moe_opt fuse_dense: no fused attention kernel for these inputs ({reasons}); "
                              "running SDPA's math kernel", RuntimeWarning, stacklevel=3)  # fmt: skip
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)


def _eager_of(module: torch.nn.Module):
    """The model family's own eager attention function (the fallback for training with dropout)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _ref(t: torch.Tensor | None):
    return weakref.ref(t) if t is not None else None


def _deref(r) -> torch.Tensor | None:
    return r() if r is not None else None


def combined_bias(
    position_bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``position_bias + mask`` in ``dtype`` (either may be None), reused while both inputs live."""
    if position_bias is None and mask is None:
        return None
    # One read of each entry: a finalizer may clear the dict at any moment (garbage collection).
    hit, bias_ref, mask_ref = _LAST_BIAS.get("sum"), _LAST_BIAS.get("bias"), _LAST_BIAS.get("mask")
    if hit is not None and _deref(bias_ref) is position_bias and _deref(mask_ref) is mask and hit.dtype == dtype:
        return hit
    if position_bias is None:
        total = mask.to(dtype)
    elif mask is None:
        total = position_bias.to(dtype)
    else:
        total = (position_bias + mask).to(dtype)
    # SDPA's fused CUDA kernels need a mask with unit stride in its last dimension; T5's position bias is
    # a permuted view (stride H there), and a sum follows its operands' layout.
    if total.stride(-1) != 1:  # also where contiguous() keeps it: a key length of 1 (first decode step)
        total = torch.empty_like(total, memory_format=torch.contiguous_format).copy_(total)
    _LAST_BIAS.update(bias=_ref(position_bias), mask=_ref(mask), sum=total)
    # Free the sum with the bias it was made from (the stack's forward holds that one).
    anchor = position_bias if position_bias is not None else mask
    weakref.finalize(anchor, _LAST_BIAS.clear)
    return total


def sdpa_attention_with_bias(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
):
    """``AttentionInterface`` function: the eager attention's result (to rounding) through SDPA.

    ``query``/``key``/``value`` are ``[B, H, Q|K, D]``; returns ``([B, Q, H, D], None)``.
    """
    # Attention dropout in training, and attention weights asked for (SDPA computes none): eager.
    if (module.training and dropout > 0.0) or kwargs.get("output_attentions"):
        return _eager_of(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            position_bias=position_bias, **kwargs,
        )  # fmt: skip
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # True = attend
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    bias = combined_bias(position_bias, attention_mask, query.dtype)
    out = _sdpa(query, key, value, bias, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the function (and the eager mask builder) under :data:`ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, sdpa_attention_with_bias)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
    except ImportError:  # no mask interface: the model builds its masks itself
        return
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
