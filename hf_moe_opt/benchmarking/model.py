"""Model-level benchmark with real configs and random weights: HF eager vs optimized.

    python benchmarks/bench_model.py --models switch-base-128 nllb-moe-54b --out benchmarks/results/model.json

Encoder throughput (tokens/s) at batch B x 128 tokens and decode time per token with a KV cache
(difference of two greedy generations, so prefill cancels out). For NLLB-MoE the HF side uses the
correct eager block (transformers 5.x's own is wrong). Also records GPU memory before and after
``optimize`` (the stacked experts are views of the original parameters: no growth expected).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import api as hf_moe_opt
from ..baselines import remove_nllb_eager_reference, use_nllb_eager_reference
from ..timing import median_ms
from .common import environment, save_result


def real_config(name: str):
    from transformers import NllbMoeConfig, SwitchTransformersConfig

    if name == "switch-base-128":
        return SwitchTransformersConfig(
            vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
            num_experts=128, expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
    if name == "nllb-moe-54b":
        return NllbMoeConfig(
            vocab_size=256206, d_model=2048, encoder_ffn_dim=8192, decoder_ffn_dim=8192, encoder_layers=24,
            decoder_layers=24, encoder_attention_heads=16, decoder_attention_heads=16, num_experts=128,
            encoder_sparse_step=4, decoder_sparse_step=4, expert_capacity=64, moe_token_dropout=0.2,
            decoder_start_token_id=2, pad_token_id=1, eos_token_id=2, bos_token_id=0, max_position_embeddings=1024,
        )  # fmt: skip
    if name == "qwen3-30b-a3b":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    raise ValueError(f"unknown model {name!r}")


@torch.no_grad()
def random_model(name: str, device: torch.device, config=None):
    """The real architecture with random bf16 weights, built directly on the device (or host memory).

    ``config`` replaces :func:`real_config`'s (a smaller one for smoke runs); ``name`` still picks the class.
    """
    from transformers import (
        NllbMoeForConditionalGeneration,
        Qwen3MoeForCausalLM,
        SwitchTransformersForConditionalGeneration,
    )

    cfg = real_config(name) if config is None else config
    classes = {"switch": SwitchTransformersForConditionalGeneration, "nllb": NllbMoeForConditionalGeneration}
    cls = classes.get(name.split("-")[0], Qwen3MoeForCausalLM)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 54B parameters do not fit an H200 in float32
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    # Host memory: 54B normal_ draws take minutes on a few cores; copies of a shared random pool at
    # random offsets take seconds and still give every matrix its own values.
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    gen = torch.Generator().manual_seed(1)
    for pname, p in model.named_parameters():
        if "router" in pname or ".mlp.gate." in pname:
            p.normal_(0.0, 1.0)  # decisive routing, as trained routers have
        elif p.dim() > 1 and device.type == "cpu":
            flat = p.view(-1)
            for start in range(0, flat.numel(), pool.numel() // 2):
                chunk = flat[start : start + pool.numel() // 2]
                offset = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
                chunk.copy_(pool[offset : offset + chunk.numel()])
        elif p.dim() > 1:
            p.normal_(0.0, 0.02)
        elif "norm" in pname:
            p.fill_(1.0)
        else:
            p.zero_()
    for module in model.modules():
        if hasattr(module, "make_weights") and hasattr(module, "offset"):  # sinusoidal positions
            module.make_weights(module.num_positions + module.offset, module.embedding_dim, module.padding_idx)
        elif isinstance(getattr(module, "inv_freq", None), torch.Tensor):  # rotary tables: to_empty left garbage
            fresh = type(module)(module.config)  # built on the host, copied in
            for buf_name, buf in fresh.named_buffers(recurse=False):
                getattr(module, buf_name).copy_(buf)
    return model.eval()


def encoder_tps(model, batch: int, seq: int, device) -> float:
    ids = torch.randint(3, 1000, (batch, seq), device=device)
    ms = median_ms(lambda: model.get_encoder()(input_ids=ids), device, repeats=5, warmup=2)
    return batch * seq / (ms * 1e-3)


def decode_ms_per_token(
    model, batch: int, device, short: int = 4, long: int = 20, prompt: int = 32, repeats: int = 3
) -> float:
    """Time of one decode step (one new token per sequence): the difference of two greedy generations of
    ``long`` and ``short`` new tokens from the same ``batch x prompt`` random prompt, so prefill cancels."""
    ids = torch.randint(3, min(1000, model.config.get_text_config().vocab_size), (batch, prompt), device=device)

    def gen(n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    t_short = median_ms(gen(short), device, repeats=repeats, warmup=1)
    t_long = median_ms(gen(long), device, repeats=repeats, warmup=1)
    return (t_long - t_short) / (long - short)


def run_model(name, device, batches, decode_batches) -> dict:
    model = random_model(name, device)
    torch.cuda.synchronize()
    rec = {"model": name, "encoder": [], "decode": []}
    is_nllb = name.startswith("nllb")
    if is_nllb:
        use_nllb_eager_reference(model)
    with torch.no_grad():
        hf = {"encoder": {b: encoder_tps(model, b, 128, device) for b in batches}}
        hf["decode"] = {b: decode_ms_per_token(model, b, device) for b in decode_batches}
        if is_nllb:
            remove_nllb_eager_reference(model)
        torch.cuda.synchronize()
        rec["memory_before_optimize_gib"] = torch.cuda.memory_allocated(device) / 2**30
        hf_moe_opt.optimize(model)
        torch.cuda.synchronize()
        rec["memory_after_optimize_gib"] = torch.cuda.memory_allocated(device) / 2**30
        for b in batches:
            opt = encoder_tps(model, b, 128, device)
            rec["encoder"].append({"batch": b, "hf_tokens_per_s": hf["encoder"][b], "opt_tokens_per_s": opt,
                                   "speedup": opt / hf["encoder"][b]})  # fmt: skip
            print(f"{name} encoder batch {b}x128: HF {hf['encoder'][b]:.0f} tok/s, opt {opt:.0f} tok/s", flush=True)
        opt_decode = {b: decode_ms_per_token(model, b, device) for b in decode_batches}
        hf_moe_opt.restore(model)
        hf_moe_opt.optimize(model, cuda_graphs=True)
        for b in decode_batches:
            graphed = decode_ms_per_token(model, b, device)
            rec["decode"].append({"batch": b, "hf_ms_per_token": hf["decode"][b], "opt_ms_per_token": opt_decode[b],
                                  "opt_graphs_ms_per_token": graphed, "speedup": hf["decode"][b] / opt_decode[b],
                                  "speedup_graphs": hf["decode"][b] / graphed})  # fmt: skip
            print(f"{name} decode batch {b}: HF {hf['decode'][b]:.2f} ms/token, opt {opt_decode[b]:.2f}, "
                  f"opt+graphs {graphed:.2f}", flush=True)  # fmt: skip
    del model
    torch.cuda.empty_cache()
    return rec


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rec in result["models"]:
        enc = rec["encoder"]
        axes[0].plot([r["batch"] for r in enc], [r["speedup"] for r in enc], marker="o", label=rec["model"])
        dec = rec["decode"]
        axes[1].plot([r["batch"] for r in dec], [r["speedup"] for r in dec], marker="o", label=rec["model"])
        axes[1].plot(
            [r["batch"] for r in dec], [r["speedup_graphs"] for r in dec], marker="s", ls="--",
            label=f"{rec['model']} + cuda_graphs",
        )  # fmt: skip
    axes[0].set(xscale="log", title="encoder throughput speed-up vs HF eager", xlabel="batch (x128 tokens)")
    axes[1].set(xscale="log", title="decode time/token speed-up vs HF eager", xlabel="batch")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"bf16, random weights, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["switch-base-128", "nllb-moe-54b"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--out", default="benchmarks/results/model.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the model benchmark needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    models = [run_model(m, device, args.batches, args.decode_batches) for m in args.models]
    save_result({"environment": environment(), "models": models}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
