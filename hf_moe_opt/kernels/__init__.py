"""Triton kernels: fused gather -> GEMM1 -> activation and GEMM2 -> weighted scatter over a dispatch plan."""

from .launch_config import KernelConfig, get_configs, torch_faster
from .moe_ffn import (
    gather_gemm_act,
    gemm_scatter,
    kernel_supported,
    kernels_interpreted,
    moe_ffn,
    moe_ffn_with_configs,
)

__all__ = [
    "KernelConfig",
    "gather_gemm_act",
    "gemm_scatter",
    "get_configs",
    "kernel_supported",
    "kernels_interpreted",
    "moe_ffn",
    "moe_ffn_with_configs",
    "torch_faster",
]
