"""Whole-step CUDA-graph decoding: time per decode step, HF eager vs optimize() vs per-layer vs step graphs.

    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py --quick       # switch-base-128, ~3 min, one H200
    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py               # + qwen3-30b-a3b and nllb-moe-54b
    PYTHONPATH=$PWD python benchmarks/bench_decode_graphs.py --cpu-smoke --out /tmp/decode.json   # tiny, CPU

Real configs with random bf16 weights (``hf_moe_opt.benchmarking.model.random_model``). For each batch
size, the time of one decode step (one new token per sequence): the difference of two greedy
generations of 4 and 20 new tokens from 32-token prompts, CUDA events, a warm-up, then the median of
repeats (``hf_moe_opt.benchmarking.model.decode_ms_per_token``). Variants, on the same weights:

* ``hf_eager``: transformers as loaded (NLLB-MoE: the correct eager reference block);
* ``optimize``: ``hf_moe_opt.optimize(model)``;
* ``layer_graphs``: ``optimize(model, cuda_graphs=True)``, each MoE layer's routed part graph-replayed;
* ``step_graphs``: ``optimize(model, cuda_graphs="step")``, whole decode steps graph-replayed.

The floor of a step: the bytes of the weights one decode step reads (the decoder's dense weights, the
LM head, and per MoE layer the experts this batch's tokens were routed to, counted in an
``optimize()`` run) over the copy bandwidth measured in the same run. The run also records whether
``step_graphs`` generates the tokens ``optimize()`` generates. Writes JSON to ``--out`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn

import hf_moe_opt
from hf_moe_opt.baselines import remove_nllb_eager_reference, use_nllb_eager_reference
from hf_moe_opt.benchmarking.common import environment, measure_ceilings, save_result
from hf_moe_opt.benchmarking.model import decode_ms_per_token, random_model
from hf_moe_opt.step_graphs import EagerCapture, runner_of

VARIANTS = ("hf_eager", "optimize", "layer_graphs", "step_graphs")
QUICK_MODELS = ["switch-base-128"]
FULL_MODELS = ["switch-base-128", "qwen3-30b-a3b", "nllb-moe-54b"]


def tiny_config(name: str):
    """A few-layer config of ``name``'s family for the CPU smoke run."""
    from transformers import Qwen3MoeConfig, SwitchTransformersConfig

    if name.startswith("switch"):
        return SwitchTransformersConfig(
            vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_experts=8, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
    if name.startswith("qwen3"):
        return Qwen3MoeConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    raise ValueError(f"no tiny config for {name!r}")


def _decoder_side(model: nn.Module, name: str) -> bool:
    """Whether parameter or module ``name`` runs in a decode step (encoder-decoders: not the encoder)."""
    return not model.config.is_encoder_decoder or "decoder" in name.split(".") or name.startswith("lm_head")


def distinct_experts(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Per decode-side MoE layer of an optimized ``model``: experts reached per decode step, on average."""
    counts: dict[str, list[int]] = {}
    hooked = []
    for name, layer in hf_moe_opt.optimized_layers(model):
        if not _decoder_side(model, name):
            continue

        def observe(layer, routing, name=name):
            if routing.expert_index.shape[0] == ids.shape[0]:  # one token per sequence: a decode step
                chosen = routing.expert_index[routing.keep_mask()]
                counts.setdefault(name, []).append(int(chosen.unique().numel()))

        layer.observers.append(observe)
        hooked.append((layer, observe))
    try:
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for layer, observe in hooked:
            layer.observers.remove(observe)
    return {name: sum(c) / len(c) for name, c in counts.items()}


def step_weight_bytes(model: nn.Module, distinct: dict[str, float]) -> float:
    """Bytes of weights one decode step reads: dense decode-side weights, the LM head (embedding tables
    otherwise read a row per token, not counted), and ``distinct[layer]`` experts of each MoE layer."""
    layers = dict(hf_moe_opt.optimized_layers(model))
    expert_ptrs = {p.data_ptr() for layer in layers.values() for p in layer.experts.parameters()}
    lm_head = model.get_output_embeddings().weight
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)} - {lm_head.data_ptr()}
    seen: set[int] = set()
    total = 0.0
    for name, p in model.named_parameters():
        ptr = p.data_ptr()
        if ptr in seen or ptr in expert_ptrs or ptr in embeddings or not _decoder_side(model, name):
            continue
        seen.add(ptr)
        total += p.numel() * p.element_size()
    if lm_head.data_ptr() not in seen:
        total += lm_head.numel() * lm_head.element_size()
    for name, n in distinct.items():
        layer = layers[name]
        per_expert = sum(p.numel() * p.element_size() for p in layer.experts.parameters()) / layer.num_experts
        total += n * per_expert
    return total


def _generated(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@torch.no_grad()
def run_model(name: str, device: torch.device, batches: list[int], args, ceilings: dict) -> dict:
    config = tiny_config(name) if args.cpu_smoke else None
    model = random_model(name, device, config)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompts = {b: torch.randint(3, min(1000, vocab), (b, args.prompt), generator=gen).to(device) for b in batches}
    times = {v: {} for v in VARIANTS}
    tokens: dict[int, torch.Tensor] = {}
    record = {"model": name, "batches": []}
    timing = dict(short=args.short, long=args.long, prompt=args.prompt, repeats=args.repeats)

    def time_all(variant: str) -> None:
        for b in batches:
            times[variant][b] = decode_ms_per_token(model, b, device, **timing)
            print(f"{name} batch {b}: {variant} {times[variant][b]:.3f} ms/step", flush=True)

    is_nllb = name.startswith("nllb")
    if is_nllb:
        use_nllb_eager_reference(model)
    time_all("hf_eager")
    if is_nllb:
        remove_nllb_eager_reference(model)

    hf_moe_opt.optimize(model)
    time_all("optimize")
    distinct, floor = {}, {}
    for b in batches:
        tokens[b] = _generated(model, prompts[b], args.long)
        distinct[b] = distinct_experts(model, prompts[b], args.long)
        floor[b] = step_weight_bytes(model, distinct[b])
    hf_moe_opt.restore(model)

    hf_moe_opt.optimize(model, cuda_graphs=True)
    time_all("layer_graphs")
    hf_moe_opt.restore(model)

    step_error, same_tokens, counts = None, {}, None
    try:
        hf_moe_opt.optimize(model, cuda_graphs="step")
    except ValueError as e:
        step_error = str(e)
        print(f"{name}: step graphs unsupported: {e}", flush=True)
    if step_error is None:
        runner = runner_of(model)
        if not runner.capture.supports(device):
            runner.capture = EagerCapture(check_host_reads=False)  # CPU smoke: same static-buffer path, eager
        try:
            time_all("step_graphs")
            for b in batches:
                same_tokens[b] = bool(torch.equal(_generated(model, prompts[b], args.long), tokens[b]))
        except RuntimeError as e:  # a failed capture: keep the other variants' numbers
            step_error = str(e)
            print(f"{name}: step graphs failed: {e}", flush=True)
        counts = dict(runner.counts)
        hf_moe_opt.restore(model)

    for b in batches:
        floor_ms = 1e3 * floor[b] / ceilings["copy_bytes_per_s"]
        row = {"batch": b, **{f"{v}_ms": times[v].get(b) for v in VARIANTS}}
        row.update(floor_ms=floor_ms, step_weight_gib=floor[b] / 2**30, distinct_experts_per_layer=distinct[b])
        row["step_tokens_equal_optimize"] = same_tokens.get(b)
        if times["step_graphs"].get(b):
            step = times["step_graphs"][b]
            row.update(step_vs_hf_eager=row["hf_eager_ms"] / step, step_vs_layer_graphs=row["layer_graphs_ms"] / step,
                       step_over_floor=step / floor_ms)  # fmt: skip
        record["batches"].append(row)
        print(f"{name} batch {b}: floor {floor_ms:.3f} ms/step ({floor[b] / 2**30:.2f} GiB read)", flush=True)
    record.update(step_graphs_unsupported=step_error, step_graph_counts=counts)
    return record


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, rec in zip(axes[0], models, strict=True):
        rows = rec["batches"]
        batches = [r["batch"] for r in rows]
        for v in VARIANTS:
            ys = [r[f"{v}_ms"] for r in rows]
            if all(y is not None for y in ys):
                ax.plot(batches, ys, marker="o", label=v)
        ax.plot(batches, [r["floor_ms"] for r in rows], ls="--", color="k", label="weight-read floor")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step", title=rec["model"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"decode step time, bf16, random weights, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help=f"default: {' '.join(FULL_MODELS)} ({QUICK_MODELS[0]} with --quick)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--quick", action="store_true", help="switch-base-128 only, 3 repeats")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (checks the script runs)")
    p.add_argument("--short", type=int, default=4, help="new tokens of the shorter generation")
    p.add_argument("--long", type=int, default=20, help="new tokens of the longer generation")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/decode_graphs.json")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        models = args.models or ["switch-tiny", "qwen3-tiny"]
        batches = args.batches if argv and "--batches" in argv else [1, 4]
        args.short, args.long, args.prompt, args.repeats = 2, 5, 8, 1
        ceilings = measure_ceilings(device, copy_numel=1 << 22, matmul_size=128)
    else:
        if not torch.cuda.is_available():
            print("error: this benchmark needs a CUDA device (or --cpu-smoke)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
        batches = args.batches
        ceilings = measure_ceilings(device)
    env = environment()
    print(f"{env['device']}: torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}")
    print(f"copy bandwidth {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)", flush=True)
    records = []
    for name in models:
        records.append(run_model(name, device, batches, args, ceilings))
        gc.collect()  # the model's memory back before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_result({"environment": env, "ceilings": ceilings, "models": records}, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
