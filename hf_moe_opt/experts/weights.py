"""Expert weights stacked into one storage whose slices *are* the model's parameters.

Grouped GEMMs want all experts of a layer in one ``[E, out, in]`` tensor; the checkpoint wants
``experts.expert_{j}.<name>.weight`` parameters. We keep both without doubling memory: the
parameters are re-pointed (``param.data = stack[j]``) at slices of one stacked tensor, so
``state_dict`` names and values are unchanged and there is one copy of every weight.

transformers 5.x's newer MoE families already store a layer's experts as one fused ``[E, ...]``
parameter (``experts.gate_up_proj``, ``experts.down_proj``, biases). :class:`FusedExpertTensor` uses
such a parameter in place: the compute sees a view of it in ``[E, out, in]`` layout (a transpose for
GPT-OSS's ``[E, in, out]`` storage), never a copy.

What an expert store (buffering cache, multi-device placement) can rely on, for both kinds:

* ``ExpertWeights.stacks()``: the ``w1, w2[, b1, b2]`` holders; each has ``tensor`` (the whole
  ``[E, ...]`` compute view), ``expert(j)`` (expert ``j``'s slice of it, a view), ``storage()``
  (the tensor that owns the memory: the stack, or the fused parameter's data, in checkpoint layout),
  ``set_storage(t)`` (re-point the parameter(s) at ``t``, same shape and layout as ``storage()``:
  e.g. pinned host memory), ``compute_view(t)`` (a tensor in storage layout seen in compute
  layout: what a store hands the backends after copying slices into its own buffers),
  ``num_experts``, ``is_current()`` and ``restack()``. ``storage()[j]`` is expert ``j``'s slice in
  checkpoint layout, contiguous when the storage is: the unit a store copies.
* ``ExpertWeights.expert(j)``: ``(w1_j, b1_j, w2_j, b2_j)`` views in compute layout, the unit a
  cache copies into a device slot; ``ExpertWeights.tensors()`` the whole-layer compute views.
* Gated experts: ``w1`` is the fused gate/up projection (``[E, 2F, D]`` in compute layout), and the
  layer's :class:`~hf_moe_opt.experts.activation.Activation` says how its ``2F`` columns split.
  Shared experts (Qwen2-MoE, DeepSeek) are not part of ``ExpertWeights``: they are ordinary
  modules of the layer and stay resident with the rest of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class ExpertStack:
    """One ``[E, *shape]`` tensor whose ``j``-th slice backs parameter ``j``."""

    def __init__(self, params: Sequence[nn.Parameter], what: str):
        if not params:
            raise ValueError(f"no expert parameters given for {what}")
        self.params = list(params)
        self.what = what
        self.tensor = self._stack()

    def _check(self) -> None:
        first = self.params[0]
        for j, p in enumerate(self.params):
            if p.device.type == "meta":
                raise ValueError(
                    f"{self.what}: expert {j} has its weights on the meta device. Load the model with real "
                    "weights (no init_empty_weights, no disk/CPU offload device_map) before hf_moe_opt.optimize."
                )
            if p.shape != first.shape or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"{self.what}: experts differ in shape, dtype or device (expert 0: {tuple(first.shape)} "
                    f"{first.dtype} {first.device}; expert {j}: {tuple(p.shape)} {p.dtype} {p.device}). "
                    "Put all experts of a layer on one device and dtype before optimizing."
                )

    @torch.no_grad()
    def _stack(self, full: bool = False) -> torch.Tensor:
        self._check()
        if self.is_current_for(getattr(self, "tensor", None), full):
            return self.tensor
        first = self.params[0]
        stacked = torch.empty((len(self.params), *first.shape), dtype=first.dtype, device=first.device)
        for j, p in enumerate(self.params):
            stacked[j].copy_(p.data)
            # Re-point the parameter at its slice; the old storage is freed right here, so the peak is
            # one layer's weights, not the model's.
            p.data = stacked[j]
        return stacked

    def is_current_for(self, tensor: torch.Tensor | None, full: bool = False) -> bool:
        """Whether the parameters are the slices of ``tensor``: by the first and last one (cheap, per
        call: ``.to()`` replaces them all), or with ``full`` every one (one re-pointed with
        ``p.data = ...`` too)."""
        if tensor is None:
            return False
        if any(p.dtype != tensor.dtype or p.device != tensor.device for p in (self.params[0], self.params[-1])):
            return False
        step = tensor.stride(0) * tensor.element_size()
        base = tensor.data_ptr()
        experts = range(len(self.params)) if full else (0, len(self.params) - 1)
        return all(self.params[j].data_ptr() == base + j * step for j in experts)

    def is_current(self, full: bool = False) -> bool:
        """Host-side check that the parameters still live in the stack (see :meth:`is_current_for`)."""
        return self.is_current_for(self.tensor, full)

    def restack(self, full: bool = False) -> torch.Tensor:
        self.tensor = self._stack(full)
        return self.tensor

    @property
    def num_experts(self) -> int:
        return len(self.params)

    def expert(self, j: int) -> torch.Tensor:
        """Expert ``j``'s weight (a view of the stack)."""
        return self.tensor[j]

    def storage(self) -> torch.Tensor:
        """The tensor owning the memory (the stack itself)."""
        return self.tensor

    def compute_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (laid out as :meth:`storage`) in compute layout: stacks are stored that way already."""
        return t

    @torch.no_grad()
    def set_storage(self, stacked: torch.Tensor) -> None:
        """Re-point every parameter at its slice of ``stacked`` (same shape as :meth:`storage`)."""
        if stacked.shape != self.tensor.shape:
            raise ValueError(
                f"{self.what}: storage of shape {tuple(stacked.shape)}, expected {tuple(self.tensor.shape)}"
            )
        for j, p in enumerate(self.params):
            p.data = stacked[j]
        self.tensor = stacked


class FusedExpertTensor:
    """A transformers fused ``[E, ...]`` expert parameter, used in place.

    Args:
        param: the parameter (e.g. ``experts.gate_up_proj``), ``[E, out, in]`` or, with
            ``transposed=True``, ``[E, in, out]``; biases are ``[E, out]``.
        what: a name for messages.
        transposed: the parameter stores ``x @ W`` weights (GPT-OSS); :attr:`tensor` is then its
            ``transpose(1, 2)`` view.

    :attr:`tensor` reads the parameter's current data on every access, so moving or casting the
    model needs no re-stacking. After :meth:`keep_experts` (expert parallelism) the parameter holds
    only some experts and :attr:`tensor` is a meta placeholder of the whole layer's shape.
    """

    def __init__(self, param: nn.Parameter, what: str, *, transposed: bool = False):
        if param.device.type == "meta":
            raise ValueError(
                f"{what} is on the meta device. Load the model with real weights (no init_empty_weights, "
                "no disk/CPU offload device_map) before hf_moe_opt.optimize."
            )
        if transposed and param.dim() != 3:
            raise ValueError(f"{what}: only [E, in, out] weights can be transposed, got shape {tuple(param.shape)}")
        self.param = param
        self.what = what
        self.transposed = transposed
        self.placeholder: torch.Tensor | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.param]

    @property
    def tensor(self) -> torch.Tensor:
        if self.placeholder is not None:
            return self.placeholder
        return self.compute_view(self.param.data)

    def compute_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (laid out as :meth:`storage`) in compute layout: the transpose for ``[E, in, out]`` storage."""
        return t.transpose(1, 2) if self.transposed else t

    @property
    def num_experts(self) -> int:
        return self.tensor.shape[0]

    @torch.no_grad()
    def keep_experts(self, experts: Sequence[int]) -> torch.Tensor:
        """Shrink the parameter to ``experts``' slices (in that order) and free the others.

        Expert parallelism: a rank holds only its experts, so the parameter becomes ``[n, ...]``
        (its ``state_dict`` entry too) while :attr:`tensor` keeps answering shape and dtype queries
        for the whole layer from a meta placeholder. Returns the kept experts in compute layout.
        """
        full = self.tensor
        data = self.param.data
        index = torch.as_tensor(list(experts), dtype=torch.long, device=data.device)
        self.param.data = data.index_select(0, index)
        self.placeholder = torch.empty(full.shape, dtype=full.dtype, device="meta")
        return self.compute_view(self.param.data)

    def expert(self, j: int) -> torch.Tensor:
        """Expert ``j``'s weight in compute layout (a view)."""
        return self.tensor[j]

    def storage(self) -> torch.Tensor:
        """The parameter's data, in checkpoint layout."""
        return self.param.data

    @torch.no_grad()
    def set_storage(self, data: torch.Tensor) -> None:
        """Re-point the parameter at ``data`` (same shape as :meth:`storage`; e.g. pinned host memory)."""
        if self.placeholder is not None:
            raise ValueError(f"{self.what}: holds only some experts (expert parallelism); its storage is fixed")
        if data.shape != self.param.shape:
            raise ValueError(f"{self.what}: storage of shape {tuple(data.shape)}, expected {tuple(self.param.shape)}")
        self.param.data = data

    def is_current(self, full: bool = False) -> bool:
        return True  # the data is read from the parameter on every access

    def restack(self, full: bool = False) -> torch.Tensor:
        return self.tensor


ExpertTensor = ExpertStack | FusedExpertTensor


@dataclass
class ExpertWeights:
    """The weights of one MoE layer's experts ``y = W2 act(W1 x + b1) + b2``.

    ``w1``: ``[E, F, D]``; ``w2``: ``[E, D, F]`` (``nn.Linear`` layout: out x in). Biases optional.
    For gated experts ``w1`` is the fused gate/up projection ``[E, 2F, D]`` and the activation
    reduces its output to ``F`` columns. Each entry is an :class:`ExpertStack` (per-expert
    parameters stacked in place) or a :class:`FusedExpertTensor` (a fused parameter used as is).
    """

    w1: ExpertTensor
    w2: ExpertTensor
    b1: ExpertTensor | None = None
    b2: ExpertTensor | None = None

    @classmethod
    def from_fused(
        cls,
        gate_up: nn.Parameter,
        down: nn.Parameter,
        *,
        gate_up_bias: nn.Parameter | None = None,
        down_bias: nn.Parameter | None = None,
        transposed: bool = False,
        prefix: str = "experts",
    ) -> ExpertWeights:
        """Wrap transformers' fused expert parameters (``[E, out, in]``, or ``[E, in, out]`` if ``transposed``)."""
        return cls(
            w1=FusedExpertTensor(gate_up, f"{prefix}.gate_up_proj", transposed=transposed),
            w2=FusedExpertTensor(down, f"{prefix}.down_proj", transposed=transposed),
            b1=None if gate_up_bias is None else FusedExpertTensor(gate_up_bias, f"{prefix}.gate_up_proj_bias"),
            b2=None if down_bias is None else FusedExpertTensor(down_bias, f"{prefix}.down_proj_bias"),
        )

    def expert(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Expert ``j``'s ``(w1, b1, w2, b2)`` in compute layout (views)."""
        return (
            self.w1.expert(j),
            None if self.b1 is None else self.b1.expert(j),
            self.w2.expert(j),
            None if self.b2 is None else self.b2.expert(j),
        )

    def stacks(self) -> list[ExpertTensor]:
        return [s for s in (self.w1, self.w2, self.b1, self.b2) if s is not None]

    def refresh(self, full: bool = False) -> None:
        """Re-stack after the parameters were moved or cast (``model.to(...)``); with ``full``, also
        after any one of them was re-pointed (``p.data = ...``)."""
        for s in self.stacks():
            if not s.is_current(full):
                s.restack(full)

    @property
    def num_experts(self) -> int:
        return self.w1.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.w1.tensor.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return (
            self.w1.tensor,
            None if self.b1 is None else self.b1.tensor,
            self.w2.tensor,
            None if self.b2 is None else self.b2.tensor,
        )
