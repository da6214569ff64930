"""The expert activation: a name kernels can specialise on, and the exact callable HF uses.

Two-matrix experts apply ``fn`` elementwise to ``x W1``. Gated (GLU) experts compute ``x W1`` with
``W1`` the fused gate and up projections (``[E, 2F, D]``) and reduce it to ``F`` columns:

* ``glu="concatenated"``: ``act(h[:, :F]) * h[:, F:]`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek: the
  halves of transformers' ``gate_up_proj``, split with ``chunk(2)`` exactly as transformers does);
* ``glu="interleaved"``: ``act(h[:, 0::2]) * h[:, 1::2]``;
* ``glu="clamped_swiglu"``: GPT-OSS's variant on interleaved columns,
  ``g = min(h[:, 0::2], limit)``, ``u = clamp(h[:, 1::2], -limit, limit)``,
  ``(u + 1) * g * sigmoid(alpha * g)``;
* ``glu="clamped_swiglu_halves"``: the same on the concatenated halves (MiniMax-M3);
* ``glu="limited_swiglu"``: on the concatenated halves, ``g = min(gate, limit)``,
  ``u = clamp(up, -limit, limit)``, ``silu(g) * u`` (GLM-5-Next, HY-V4);
* ``glu="act_limited"``: on the concatenated halves, the limit after the activation:
  ``min(act(gate), limit) * clamp(up, -limit, limit)`` (Step-3.7, Bailing hybrid's later experts);
* ``glu="softcapped_swiglu"``: on the concatenated halves, computed in float32,
  ``cap(gate, alpha) * sigmoid(gate) * cap(up, limit)`` with ``cap(x, c) = c * tanh(x / c)``
  (Inkling 2: the softcaps bound the linear gate factor and the up half, the sigmoid sees the raw gate);
* ``glu="custom"``: ``gate_fn`` maps ``[rows, 2F]`` to ``[rows, F]`` (an experts module's own
  ``_apply_gate``); nothing can specialise on it.

Backends call :meth:`Activation.apply`, which covers every case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# Names the fused kernels implement natively; other activations run through ``fn``.
KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu2")

GLU_LAYOUTS = (
    "concatenated",
    "interleaved",
    "clamped_swiglu",
    "clamped_swiglu_halves",
    "limited_swiglu",
    "act_limited",
    "softcapped_swiglu",
    "custom",
)


@dataclass(frozen=True)
class Activation:
    """An expert activation.

    Attributes:
        name: the activation's name (for gated experts prefixed, e.g. ``"glu_silu"``, so kernels that
            only know elementwise activations never take a gated one for theirs).
        fn: the elementwise activation (for gated experts: applied to the gate half).
        glu: ``None`` for two-matrix experts, else one of :data:`GLU_LAYOUTS`.
        alpha, limit: the clamped SwiGLU's sigmoid gain and clamp (``alpha``: the clamped layouts only;
            ``limit``: the clamped, limited and act-limited layouts); for ``glu="softcapped_swiglu"``
            the gate's and the up half's softcaps.
        gate_fn: ``[rows, 2F] -> [rows, F]`` for ``glu="custom"``.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    glu: str | None = None
    alpha: float | None = None
    limit: float | None = None
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.glu is not None and self.glu not in GLU_LAYOUTS:
            raise ValueError(f"unknown GLU layout {self.glu!r}; choose one of {', '.join(GLU_LAYOUTS)}")
        if self.glu in ("clamped_swiglu", "clamped_swiglu_halves") and (self.alpha is None or self.limit is None):
            raise ValueError("a clamped SwiGLU needs alpha and limit")
        if self.glu in ("limited_swiglu", "act_limited") and self.limit is None:
            raise ValueError(f"a {self.glu} GLU needs limit")
        if self.glu == "softcapped_swiglu" and (not self.alpha or not self.limit):
            raise ValueError("a softcapped SwiGLU needs nonzero gate and up softcaps (alpha, limit)")
        if self.glu == "custom" and self.gate_fn is None:
            raise ValueError("a custom GLU needs gate_fn")

    @property
    def gated(self) -> bool:
        """Whether GEMM1 yields ``2F`` columns that this activation reduces to ``F``."""
        return self.glu is not None

    @property
    def kernel_supported(self) -> bool:
        return self.glu is None and self.name in KERNEL_ACTIVATIONS

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``[rows, W1 out] -> [rows, W2 in]``: the activation, gated or not."""
        if self.glu is None:
            return self.fn(h)
        if self.glu == "concatenated":
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate) * up
        if self.glu == "interleaved":
            return self.fn(h[..., 0::2]) * h[..., 1::2]
        if self.glu in ("clamped_swiglu", "clamped_swiglu_halves"):
            gate, up = (h[..., 0::2], h[..., 1::2]) if self.glu == "clamped_swiglu" else h.chunk(2, dim=-1)
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        if self.glu == "limited_swiglu":
            gate, up = h.chunk(2, dim=-1)
            gate = gate.clamp(min=None, max=self.limit)
            return torch.nn.functional.silu(gate) * up.clamp(min=-self.limit, max=self.limit)
        if self.glu == "softcapped_swiglu":
            gate, up = (t.float() for t in h.chunk(2, dim=-1))
            capped = torch.tanh(gate / self.alpha) * self.alpha * torch.sigmoid(gate)
            return (capped * (torch.tanh(up / self.limit) * self.limit)).to(h.dtype)
        if self.glu == "act_limited":
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate).clamp(min=None, max=self.limit) * up.clamp(min=-self.limit, max=self.limit)
        return self.gate_fn(h)


def activation_name(act_fn: Callable, configs: Iterable[object]) -> str:
    """The ``hidden_act`` name that built ``act_fn``, from the first of ``configs`` whose name builds
    ``act_fn``'s class; else the class name, which no kernel knows, so ``act_fn`` itself runs.

    The Triton kernels pick their activation by this name, not by ``act_fn``: a config whose
    ``hidden_act`` did not build it (a sub-config's, a hard-coded activation) must not be trusted.
    """
    from transformers.activations import ACT2CLS

    for config in configs:
        name = getattr(config, "hidden_act", None)
        cls = ACT2CLS.get(name) if isinstance(name, str) else None
        if isinstance(cls, tuple):  # (class, constructor kwargs)
            cls = cls[0]
        if cls is not None and type(act_fn) is cls:
            return name
    return type(act_fn).__name__


def glu_activation(name: str, fn: Callable[[torch.Tensor], torch.Tensor], *, interleaved: bool = False) -> Activation:
    """``act(gate) * up`` over GEMM1's ``2F`` columns (gate first half, or even columns if ``interleaved``)."""
    return Activation(f"glu_{name}", fn, glu="interleaved" if interleaved else "concatenated")


def limited_swiglu_activation(limit: float) -> Activation:
    """SiLU-GLU on concatenated gate/up halves, the gate clamped above and the up clamped to ``±limit``."""
    return Activation("limited_swiglu", torch.nn.functional.silu, glu="limited_swiglu", limit=float(limit))


def act_limited_glu_activation(name: str, fn: Callable[[torch.Tensor], torch.Tensor], limit: float) -> Activation:
    """``min(act(gate), limit) * clamp(up, -limit, limit)`` on concatenated gate/up halves."""
    return Activation(f"glu_{name}", fn, glu="act_limited", limit=float(limit))


def softcapped_swiglu_activation(gate_cap: float, up_cap: float) -> Activation:
    """Inkling 2's SwiGLU: ``cap(gate) * sigmoid(gate) * cap(up)``, ``cap(x, c) = c * tanh(x / c)``."""
    return Activation(
        "softcapped_swiglu", torch.sigmoid, glu="softcapped_swiglu", alpha=float(gate_cap), limit=float(up_cap)
    )


def clamped_swiglu_activation(alpha: float, limit: float, *, interleaved: bool = True) -> Activation:
    """GPT-OSS's clamped SwiGLU on interleaved gate/up columns (or, not ``interleaved``, on the
    concatenated halves, as MiniMax-M3 stores them)."""
    glu = "clamped_swiglu" if interleaved else "clamped_swiglu_halves"
    return Activation("clamped_swiglu", torch.sigmoid, glu=glu, alpha=float(alpha), limit=float(limit))
