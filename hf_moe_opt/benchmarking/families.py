"""Fused-expert families at real layer shapes: transformers' own experts implementations vs ours.

    hf-moe-opt bench families --out benchmarks/results/families_h200.json

For the Mixtral-8x7B and Qwen3-30B-A3B MoE blocks (random weights, bf16), in one run on one GPU:
the HF block with ``experts_implementation="grouped_mm"`` (transformers' default on CUDA) and
``"eager"``, and our layer with the torch and Triton backends; each eager and, where capturable,
CUDA-graph replayed; the floor from the bandwidth and matmul rate measured in the same run; ratios.
Llama 4's blocks (Scout: 16 experts; Maverick's MoE layers: 128) have one transformers
implementation, every expert on every token (``hf_dense``); their floor counts the shared MLP, which
runs for every token, as one more expert, as DeepSeek-V4's (transformers' default config: 256 experts,
k = 6, limited-SwiGLU experts) counts its shared expert.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..argparsing import OneLineErrorParser
from ..experts import available_backends
from ..timing import median_ms
from .common import (
    add_floor_ratios,
    environment,
    json_out,
    measure_ceilings,
    memory_bandwidth,
    plot_by_shape,
    print_ceilings,
    save_result,
)
from .layer import graphed, peak_mb

TOKENS = (1, 8, 64, 512, 4096, 16384)

# name: (transformers config class, block module, block class, config kwargs)
FAMILY_SHAPES = {
    "mixtral-8x7b": (
        "MixtralConfig",
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralSparseMoeBlock",
        {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        {
            "hidden_size": 2048,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
        },
    ),
}
_LLAMA4 = {"hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_experts_per_tok": 1}
for _name, _experts in (("llama4-scout", 16), ("llama4-maverick", 128)):
    FAMILY_SHAPES[_name] = (
        "Llama4TextConfig",
        "transformers.models.llama4.modeling_llama4",
        "Llama4TextMoe",
        {**_LLAMA4, "num_local_experts": _experts},
    )
# DeepSeek-V4's learned-routing block at transformers' default config (256 experts, k = 6, a shared expert).
FAMILY_SHAPES["deepseek-v4"] = (
    "DeepseekV4Config",
    "transformers.models.deepseek_v4.modeling_deepseek_v4",
    "DeepseekV4SparseMoeBlock",
    {
        "hidden_size": 4096,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "num_experts_per_tok": 6,
        "mlp_layer_types": ["moe"],
    },
)
# ZAYA1's block (16 experts, top-1, an MLP router) and ERNIE 4.5 VL's text experts (64, k = 6) at their
# configs' defaults; ERNIE's shared experts live outside the sparse block, so neither side runs them.
FAMILY_SHAPES["zaya"] = ("ZayaConfig", "transformers.models.zaya.modeling_zaya", "ZayaSparseMoeBlock", {})
FAMILY_SHAPES["ernie4.5-vl-text"] = (
    "Ernie4_5_VLMoeTextConfig",
    "transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe",
    "Ernie4_5_VLMoeSparseMoeBlock",
    {},
)
# Blocks whose shared MLP (one expert's size) runs for every token: one more expert in the floor.
SHARED_EXPERT = ("llama4-scout", "llama4-maverick", "deepseek-v4")
# Largest batch of Llama 4's every-expert HF block per shape (Maverick's [128, N, 2F] intermediate
# alone is 17 GB at 4096 tokens).
DENSE_MAX_TOKENS = {"llama4-scout": 16384, "llama4-maverick": 4096}


def build_block(name: str, device: torch.device):
    import importlib
    import inspect

    import transformers

    config_name, module, block_name, kwargs = FAMILY_SHAPES[name]
    config = getattr(transformers, config_name)(num_hidden_layers=1, **kwargs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: Maverick's float32 block would take 64 GB
    block_class = getattr(importlib.import_module(module), block_name)
    # DeepSeek-V4's and ZAYA1's blocks take their layer index (DeepSeek-V4: a hash or a learned router);
    # ERNIE 4.5 VL's sparse blocks their experts' width (the text experts' here).
    params = inspect.signature(block_class).parameters
    extra: tuple = ()
    if "layer_idx" in params:
        extra = (0,)
    elif "intermediate_size" in params:
        extra = (config.moe_intermediate_size[0],)
    try:
        with torch.device(device):
            block = block_class(config, *extra)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in block.parameters():  # fused expert parameters start uninitialised
            p.normal_(0.0, 0.02)
    return block.to(torch.bfloat16).eval(), config


def _dims(config) -> tuple[int, int, int, int]:
    e = getattr(config, "num_local_experts", None) or config.num_experts
    f = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    f = f[0] if isinstance(f, list) else f  # ERNIE 4.5 VL: [text, vision] widths
    return e, config.hidden_size, f, config.num_experts_per_tok


def _chosen_experts(block, x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[N, k]`` experts the HF block routes tokens ``x`` ``[N, D]`` to."""
    if hasattr(block, "gate"):
        if hasattr(block.gate, "router_mlp"):  # ZAYA1's router takes [B, S, D] tokens
            return block.gate(x.unsqueeze(0))[2]
        return block.gate(x)[2]
    _, logits = block.router(x)  # Llama 4: (scores, logits)
    return torch.topk(logits, k, dim=1).indices


def _hidden(out):
    """A block's hidden states (Llama 4's and ERNIE 4.5 VL's blocks return ``(hidden, router_logits)``,
    ZAYA1's ``(hidden, router state)``)."""
    return out[0] if isinstance(out, tuple) else out


def floor_ms(active: int, d: int, f: int, assignments: int, ceilings: dict) -> float:
    """max(active experts' bytes / memory bandwidth, FLOPs / matmul rate) for three-matrix GLU experts."""
    weight_bytes = active * 3 * d * f * 2
    flops = 2 * assignments * 3 * d * f
    return 1e3 * max(weight_bytes / memory_bandwidth(ceilings), flops / ceilings["bf16_flops_per_s"])


def _time_variant(rows, key, fn, inputs, tokens, device, repeats, graph: bool) -> None:
    for n in tokens:
        x = inputs[n]
        try:
            rows[n][f"{key}_ms"] = median_ms(lambda x=x: fn(x), device, repeats)
            rows[n][f"{key}_peak_mb"] = peak_mb(lambda x=x: fn(x), device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            rows[n][f"{key}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            continue
        if graph:
            try:
                rows[n][f"{key}_graph_ms"] = median_ms(graphed(fn, x), device, repeats)
            except RuntimeError as err:  # not capturable (host syncs)
                rows[n][f"{key}_graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                torch.cuda.synchronize()


def bench_family(name: str, device, ceilings, tokens, repeats, eager_max_tokens: int) -> list[dict]:
    from ..patches import find_patch

    block, config = build_block(name, device)
    e, d, f, k = _dims(config)
    shared = 1 if name in SHARED_EXPERT else 0
    inputs = {n: torch.randn(1, n, d, device=device, dtype=torch.bfloat16) for n in tokens}
    rows = {n: {"shape": name, "tokens": n, "E": e, "D": d, "F": f, "k": k} for n in tokens}
    with torch.no_grad():
        for n in tokens:
            index = _chosen_experts(block, inputs[n].view(-1, d), k)
            active = int(torch.unique(index).numel())
            rows[n]["active_experts"] = active
            rows[n]["floor_ms"] = floor_ms(active + shared, d, f, n * (k + shared), ceilings)
        if name in DENSE_MAX_TOKENS:
            checked = [n for n in tokens if n <= DENSE_MAX_TOKENS[name]]
            _time_variant(rows, "hf_dense", block, inputs, checked, device, max(3, repeats // 4), graph=True)
        else:
            checked = tokens
            config._experts_implementation = "grouped_mm"
            _time_variant(rows, "hf_grouped_mm", block, inputs, tokens, device, repeats, graph=True)
            config._experts_implementation = "eager"
            small = [n for n in tokens if n <= eager_max_tokens]
            _time_variant(rows, "hf_eager", block, inputs, small, device, max(3, repeats // 4), graph=False)
            config._experts_implementation = "grouped_mm"
        reference = {n: _hidden(block(inputs[n])) for n in checked}
        torch.cuda.empty_cache()
        layer = find_patch(block).build(block, config, capacity="model", backend="torch")
        for backend in [b for b in ("torch", "triton") if b in available_backends()]:
            layer.backend = backend
            layer._resolved.clear()
            _time_variant(rows, backend, layer, inputs, tokens, device, repeats, graph=True)
            for n in checked:
                diff = (_hidden(layer(inputs[n])).float() - reference[n].float()).abs().max().item()
                rows[n][f"{backend}_max_abs_diff_vs_hf"] = diff
    for r in rows.values():
        add_floor_ratios(r)
        for hf in ("hf_grouped_mm", "hf_dense"):
            for ours in ("torch", "triton"):
                for suffix in ("", "_graph"):
                    if f"{hf}{suffix}_ms" in r and f"{ours}{suffix}_ms" in r:
                        r[f"{hf}_over_{ours}{suffix}"] = r[f"{hf}{suffix}_ms"] / r[f"{ours}{suffix}_ms"]
    return list(rows.values())


def plot(result: dict, path: Path) -> None:
    series = [
        ("hf_eager_ms", "HF eager"),
        ("hf_grouped_mm_ms", "HF grouped_mm"),
        ("hf_grouped_mm_graph_ms", "HF grouped_mm, graph"),
        ("hf_dense_ms", "HF, every expert (Llama 4)"),
        ("hf_dense_graph_ms", "HF, every expert, graph"),
        ("torch_graph_ms", "ours torch, graph"),
        ("triton_ms", "ours triton"),
        ("triton_graph_ms", "ours triton, graph"),
        ("floor_ms", "floor"),
    ]
    plot_by_shape(result, path, series, "MoE block time, bf16", width=5)


def main(argv=None, prog: str | None = None) -> int:
    p = OneLineErrorParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(FAMILY_SHAPES), choices=list(FAMILY_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--eager-max-tokens", type=int, default=512, help="skip HF's eager loop above this")
    p.add_argument("--out", type=json_out, default="benchmarks/results/families.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the families benchmark needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    print_ceilings(ceilings)
    rows = []
    for name in args.shapes:
        for r in bench_family(name, device, ceilings, args.tokens, args.repeats, args.eager_max_tokens):
            rows.append(r)
            cols = [f"{k}={v:.3f}" for k, v in r.items() if k.endswith("_ms")]
            print(f"{name:>14} n={r['tokens']:>5} " + " ".join(cols), flush=True)
        torch.cuda.empty_cache()
    save_result({"environment": environment(), "ceilings": ceilings, "rows": rows}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
