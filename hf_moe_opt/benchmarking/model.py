"""Model-level benchmark with real configs and random weights: HF eager vs optimized, beside the floor.

    python benchmarks/bench_model.py --models switch-base-128 nllb-moe-54b --out benchmarks/results/model.json
    python benchmarks/bench_model.py --cpu-smoke --out /tmp/model.json     # tiny configs on the CPU

Encoder throughput (tokens/s) at batch B x 128 tokens, and decode time per token with a KV cache
(difference of two greedy generations, so prefill cancels out) for HF eager, ``optimize(model)``,
per-layer CUDA graphs (``cuda_graphs=True``) and whole-step CUDA graphs (``cuda_graphs="step"``).
Where a model or transformers version cannot capture whole steps, ``optimize`` raises ValueError: its
message is recorded as ``step_graphs_unsupported`` and the step-graph times are null.
``step_tokens_equal_opt`` records whether step graphs generate the tokens ``optimize(model)`` does.

Every row has its floor ``floor_ms`` (see :mod:`hf_moe_opt.benchmarking.floors`: the bytes a forward
must read over the copy bandwidth, or for the encoder the matmul FLOPs over the bf16 matmul rate if
that is longer, both measured at the start of the same run and recorded as ``ceilings``) and the
ratios measured / floor (``*_x_floor``). For NLLB-MoE the HF side uses the correct eager block
(transformers 5.x's own is wrong). Also records GPU memory before and after ``optimize`` (the stacked
experts are views of the original parameters: no growth expected).

``--cpu-smoke`` runs tiny configs on the CPU, with the ceilings measured on the CPU and whole steps run
by the eager stand-in of a CUDA graph (:class:`hf_moe_opt.step_graphs.EagerCapture`): it checks that
the benchmark runs; its times mean nothing.
"""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import api as hf_moe_opt
from .. import encoder_graphs
from ..argparsing import OneLineErrorParser
from ..baselines import hf_reference
from ..dense import fuse_dense, unfuse_dense
from ..step_graphs import EagerCapture, runner_of
from ..timing import median_ms
from .common import add_floor_ratios, environment, json_out, measure_ceilings, print_ceilings, save_result
from .floors import decode_floor, encoder_floor

DEFAULT_MODELS = ["switch-base-128", "nllb-moe-54b"]
SMOKE_MODELS = ["switch-tiny", "nllb-tiny"]
# Decode timing: new tokens of the two generations, prompt tokens per sequence, repeats.
DECODE_TIMING = {"short": 4, "long": 20, "prompt": 32, "repeats": 3}
SMOKE_DECODE_TIMING = {"short": 2, "long": 5, "prompt": 8, "repeats": 1}


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
    model.tie_weights()  # to_empty gives tied weights (embedding and LM head) storage of their own
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


def tiny_config(name: str):
    """A few-layer config of ``name``'s family (switch, nllb, qwen3) for CPU smoke runs."""
    from transformers import NllbMoeConfig, Qwen3MoeConfig, SwitchTransformersConfig

    if name.startswith("switch"):
        return SwitchTransformersConfig(
            vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_experts=8, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
    if name.startswith("nllb"):
        return NllbMoeConfig(
            vocab_size=256, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, num_experts=8, encoder_sparse_step=1,
            decoder_sparse_step=1, expert_capacity=64, moe_token_dropout=0.2, decoder_start_token_id=2,
            pad_token_id=1, eos_token_id=2, bos_token_id=0, max_position_embeddings=64,
        )  # fmt: skip
    if name.startswith("qwen3"):
        return Qwen3MoeConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    raise ValueError(f"no tiny config for {name!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(model, batch: int, length: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch x length`` random token ids (3 .. 1000, within the vocabulary), drawn on the host."""
    high = min(1000, model.config.get_text_config().vocab_size)
    return torch.randint(3, high, (batch, length), generator=generator).to(device)


def encoder_ms(model, ids: torch.Tensor, device, repeats: int = 5) -> float:
    """Median time of one ``model.get_encoder()(input_ids=ids)``, ms."""
    return median_ms(lambda: model.get_encoder()(input_ids=ids), device, repeats=repeats, warmup=2)


def encoder_tps(model, batch: int, seq: int, device) -> float:
    """Encoder throughput at ``batch x seq`` random tokens, tokens/s."""
    return batch * seq / (encoder_ms(model, random_ids(model, batch, seq, device), device) * 1e-3)


def _token_rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token ``|a - ref| / |ref|`` (row norms over the hidden dimension), flattened."""
    return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).flatten()


@torch.no_grad()
def float32_encoder(model, ids: torch.Tensor, device) -> torch.Tensor | None:
    """The (unoptimized) encoder's output in float32 -- the yardstick for bf16 rounding -- where a float32
    copy of the model fits in half the free device memory; the model is cast back (bf16 -> fp32 -> bf16 is
    exact). None where it does not fit."""
    nbytes = sum(p.numel() for p in model.parameters()) * 2  # the float32 copy adds this much
    if device.type == "cuda" and nbytes > 0.5 * torch.cuda.mem_get_info(device)[0]:
        return None
    dtype = next(model.parameters()).dtype
    model.float()
    try:
        return model.get_encoder()(input_ids=ids).last_hidden_state.float()
    finally:
        model.to(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def encoder_fused(model, enc_ids: dict[int, torch.Tensor], device, truth: torch.Tensor | None = None):
    """Encoder ms per batch with ``fuse_dense`` on, and how far its output is from the unfused one:
    per token ``|fused - unfused| / |unfused|`` (max, median, share above 1e-2); with ``truth`` (the
    float32 model's output for the first batch) also both outputs' median distance from it. The model
    is left unfused."""
    ms, diff = {}, {}
    for i, (b, ids) in enumerate(enc_ids.items()):
        with torch.no_grad():
            plain = model.get_encoder()(input_ids=ids).last_hidden_state.float()
            fuse_dense(model)
            ms[b] = encoder_ms(model, ids, device)
            fused = model.get_encoder()(input_ids=ids).last_hidden_state.float()
            unfuse_dense(model)
        # Per token: |fused - plain| / |plain| (row norms). Rounding moves most tokens by ~1e-3; a
        # token whose top-1 expert flips on a near-tie (or whose capacity drop moves) changes a lot.
        rel = _token_rel(fused, plain)
        diff[b] = {"fused_rel_diff": rel.max().item(), "fused_rel_diff_median": rel.median().item(),
                   "fused_tokens_changed": (rel > 1e-2).float().mean().item(),
                   "fused_equal": bool(torch.equal(fused, plain))}  # fmt: skip
        if i == 0 and truth is not None:
            diff[b]["opt_vs_fp32_median"] = _token_rel(plain, truth).median().item()
            diff[b]["fused_vs_fp32_median"] = _token_rel(fused, truth).median().item()
            print(
                f"  batch {b}: median per-token distance from the float32 model: optimize "
                f"{diff[b]['opt_vs_fp32_median']:.3g}, + fuse_dense {diff[b]['fused_vs_fp32_median']:.3g}"
            )
    return ms, diff


def encoder_fused_graphs(model, enc_ids: dict[int, torch.Tensor], device) -> tuple[dict, dict]:
    """Encoder ms per batch with ``fuse_dense`` and ``cuda_graphs="encoder"`` (the warm-up captures),
    and whether the replayed output equals the eager fused one bit for bit. Off CUDA: empty."""
    if device.type != "cuda":
        return {}, {}
    ms, same = {}, {}
    try:
        encoder_graphs.check_supported(model)
    except ValueError as err:
        print(f"  encoder graphs not measured: {err}", flush=True)
        return {}, {}
    fuse_dense(model)
    encoder_graphs.attach(model)
    try:
        for b, ids in enc_ids.items():
            with torch.no_grad():
                ms[b] = encoder_ms(model, ids, device)
                replayed = model.get_encoder()(input_ids=ids).last_hidden_state
                runner = encoder_graphs.runner_of(model)
                eager = type(runner.encoder).forward(runner.encoder, input_ids=ids).last_hidden_state
            same[b] = {"graph_equal_fused": bool(torch.equal(replayed, eager)), "graph_counts": dict(runner.counts)}
    finally:
        encoder_graphs.detach(model)
        unfuse_dense(model)
    return ms, same


def generated(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` new tokens."""
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def decode_ms_per_token(
    model, batch: int, device, short: int = 4, long: int = 20, prompt: int = 32, repeats: int = 3, ids=None
) -> float:
    """Time of one decode step (one new token per sequence): the difference of two greedy generations of
    ``long`` and ``short`` new tokens from the same ``batch x prompt`` random prompt (or ``ids``), so
    prefill cancels."""
    if ids is None:
        ids = random_ids(model, batch, prompt, device)
    t_short = median_ms(lambda: generated(model, ids, short), device, repeats=repeats, warmup=1)
    t_long = median_ms(lambda: generated(model, ids, long), device, repeats=repeats, warmup=1)
    step = (t_long - t_short) / (long - short)
    if step <= 0:
        # Host jitter larger than the steps' own time: no measurement, rather than a negative one.
        warnings.warn(
            f"decode step time lost in timing noise ({long} tokens {t_long:.2f} ms, {short} tokens "
            f"{t_short:.2f} ms); reported as NaN",
            stacklevel=2,
        )
        return float("nan")
    return step


def optimize_step_graphs(model, device: torch.device) -> str | None:
    """``optimize(model, cuda_graphs="step")``; returns None, or the ValueError message of a model (or
    transformers version) whose decode steps cannot be captured whole, the model then left as it was.

    On a device without CUDA graphs the runner gets the eager stand-in
    (:class:`~hf_moe_opt.step_graphs.EagerCapture`): the same static-buffer path, run eagerly.
    """
    try:
        hf_moe_opt.optimize(model, cuda_graphs="step")
    except ValueError as e:
        return str(e)
    runner = runner_of(model)
    if not runner.capture.supports(device):
        runner.capture = EagerCapture(check_host_reads=False)
    return None


def run_step_graphs(model, device: torch.device, measure: Callable[[], None], name: str = "") -> dict:
    """Run ``measure()`` with ``model`` optimized with whole-step graphs, then restore it.

    Returns ``step_graphs_unsupported`` (None; why the model cannot capture whole steps; or the error of a
    failed capture, after which ``measure`` stopped), ``step_graph_counts`` (the runner's captures,
    replays, eager forwards and fallbacks) and ``step_graphs_capture`` (``"cuda_graph"`` or, off CUDA,
    ``"eager_stand_in"``).
    """
    error = optimize_step_graphs(model, device)
    if error is not None:
        print(f"{name}: step graphs unsupported: {error}", flush=True)
        return {"step_graphs_unsupported": error, "step_graph_counts": None, "step_graphs_capture": None}
    runner = runner_of(model)
    capture = "eager_stand_in" if isinstance(runner.capture, EagerCapture) else "cuda_graph"
    try:
        measure()
    except RuntimeError as e:  # a failed capture: the other variants' numbers stand
        error = str(e)
        print(f"{name}: step graphs failed: {e}", flush=True)
    finally:
        counts = dict(runner.counts)
        hf_moe_opt.restore(model)
    return {"step_graphs_unsupported": error, "step_graph_counts": counts, "step_graphs_capture": capture}


def _memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**30


def _fmt(ms: float | None, floor: float) -> str:
    return "n/a" if ms is None else f"{ms:.3f} ({ms / floor:.1f}x floor)"


@torch.no_grad()
def run_model(
    name: str,
    device: torch.device,
    batches: list[int],
    decode_batches: list[int],
    ceilings: dict,
    seq: int = 128,
    timing: dict | None = None,
    config=None,
) -> dict:
    """Every measurement of one model (``config``: a smaller one of the same family, for smoke runs)."""
    timing = dict(DECODE_TIMING if timing is None else timing)
    short, long = timing["short"], timing["long"]
    model = random_model(name, device, config)
    _sync(device)
    gen = torch.Generator().manual_seed(0)
    enc_ids = {b: random_ids(model, b, seq, device, gen) for b in batches}
    prompts = {b: random_ids(model, b, timing["prompt"], device, gen) for b in decode_batches}
    rec = {"model": name, "encoder": [], "decode": []}

    def decode_all() -> dict[int, float]:
        return {b: decode_ms_per_token(model, b, device, ids=prompts[b], **timing) for b in decode_batches}

    with hf_reference(model):
        truth = float32_encoder(model, enc_ids[batches[0]], device)
        hf_enc = {b: encoder_ms(model, enc_ids[b], device) for b in batches}
        hf_dec = decode_all()
    rec["memory_before_optimize_gib"] = _memory_gib(device)
    hf_moe_opt.optimize(model)
    rec["memory_after_optimize_gib"] = _memory_gib(device)
    opt_enc = {b: encoder_ms(model, enc_ids[b], device) for b in batches}
    fused_enc, fused_diff = encoder_fused(model, enc_ids, device, truth)
    graph_enc, graph_same = encoder_fused_graphs(model, enc_ids, device)
    enc_floor = {b: encoder_floor(model, enc_ids[b], ceilings) for b in batches}
    for b in batches:
        hf_ms, opt_ms, fused_ms = hf_enc[b], opt_enc[b], fused_enc[b]
        row = {"batch": b, "hf_tokens_per_s": b * seq / (hf_ms * 1e-3),
               "opt_tokens_per_s": b * seq / (opt_ms * 1e-3), "speedup": hf_ms / opt_ms, "tokens": b * seq,
               "opt_fused_tokens_per_s": b * seq / (fused_ms * 1e-3), "speedup_fused": hf_ms / fused_ms,
               "hf_ms": hf_ms, "opt_ms": opt_ms, "opt_fused_ms": fused_ms, **fused_diff[b], **enc_floor[b]}  # fmt: skip
        if b in graph_enc:
            row.update(opt_fused_graph_ms=graph_enc[b], speedup_fused_graph=hf_ms / graph_enc[b], **graph_same[b])
        add_floor_ratios(row)
        rec["encoder"].append(row)
        print(f"{name} encoder batch {b}x{seq}: HF {row['hf_tokens_per_s']:.0f} tok/s, "
              f"opt {row['opt_tokens_per_s']:.0f} tok/s, +fuse_dense {row['opt_fused_tokens_per_s']:.0f} tok/s; "
              f"ms: HF {_fmt(hf_ms, row['floor_ms'])}, opt {_fmt(opt_ms, row['floor_ms'])}, "
              f"+fuse_dense {_fmt(fused_ms, row['floor_ms'])} (per-token rel. diff median "
              f"{row['fused_rel_diff_median']:.2g}, {row['fused_tokens_changed']:.2%} of tokens above 1e-2); "
              f"+graphs {_fmt(row.get('opt_fused_graph_ms'), row['floor_ms'])} "
              f"(speed-up {row.get('speedup_fused_graph') or float('nan'):.1f}x, "
              f"equal {row.get('graph_equal_fused')}); "
              f"floor {row['floor_ms']:.3g} ms ({row['floor_bound']}-bound: "
              f"{row['read_gib']:.3g} GiB, {row['tflop']:.3g} TFLOP)", flush=True)  # fmt: skip
    if not decode_batches:  # encoder only
        hf_moe_opt.restore(model)
        return rec
    opt_dec = decode_all()
    dec_floor = {b: decode_floor(model, prompts[b], short, long, ceilings) for b in decode_batches}
    tokens = {b: generated(model, prompts[b], long) for b in decode_batches}
    hf_moe_opt.restore(model)
    hf_moe_opt.optimize(model, cuda_graphs=True)
    graphed = decode_all()
    hf_moe_opt.restore(model)

    step, same_tokens = {}, {}

    def measure_step_graphs() -> None:
        for b in decode_batches:
            step[b] = decode_ms_per_token(model, b, device, ids=prompts[b], **timing)
            same_tokens[b] = bool(torch.equal(generated(model, prompts[b], long), tokens[b]))

    rec.update(run_step_graphs(model, device, measure_step_graphs, name))

    for b in decode_batches:
        floor = {k: v for k, v in dec_floor[b].items() if k != "distinct_experts_per_layer"}
        row = {"batch": b, "hf_ms_per_token": hf_dec[b], "opt_ms_per_token": opt_dec[b],
               "opt_graphs_ms_per_token": graphed[b], "opt_step_graphs_ms_per_token": step.get(b),
               "speedup": hf_dec[b] / opt_dec[b], "speedup_graphs": hf_dec[b] / graphed[b],
               "speedup_step_graphs": hf_dec[b] / step[b] if step.get(b) else None,
               "step_tokens_equal_opt": same_tokens.get(b), **floor}  # fmt: skip
        for key in [k for k in row if k.endswith("_ms_per_token")]:
            value = row[key]
            row[key.replace("_ms_per_token", "_x_floor")] = None if value is None else value / row["floor_ms"]
        rec["decode"].append(row)
        f = row["floor_ms"]
        print(f"{name} decode batch {b}: ms/token HF {_fmt(hf_dec[b], f)}, opt {_fmt(opt_dec[b], f)}, "
              f"opt+graphs {_fmt(graphed[b], f)}, opt+step graphs {_fmt(step.get(b), f)}; floor {f:.3g} ms "
              f"({row['read_gib']:.3g} GiB, KV {row['kv_read_gib']:.3g}; "
              f"{row['experts_per_moe_layer'] or 0:.1f} experts/MoE layer)", flush=True)  # fmt: skip
    if rec["step_graphs_unsupported"] is None and not all(same_tokens.values()):
        print(f"{name}: step graphs generated other tokens than optimize() at some batch", flush=True)
    return rec


# Decode variants: (row key prefix, label, marker, line style).
VARIANTS = [("hf", "HF eager", "o", ":"), ("opt", "optimized", "s", "-"), ("opt_graphs", "+ layer graphs", "^", "--"),
            ("opt_step_graphs", "+ step graphs", "D", "-.")]  # fmt: skip
ENCODER_FUSED = ("opt_fused", "+ fuse_dense", "P", "--")
ENCODER_GRAPHS = ("opt_fused_graph", "+ fuse_dense + encoder graphs", "*", "-.")


def plot(result: dict, path: Path) -> None:
    """Speed-ups vs HF eager (top) and measured / floor (bottom), encoder (left) and decode (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rec in enumerate(result["models"]):
        color = colors[i % len(colors)]
        enc, dec = rec["encoder"], rec["decode"]
        if enc:
            axes[0][0].plot([r["batch"] for r in enc], [r["speedup"] for r in enc], marker="o", color=color,
                            label=rec["model"])  # fmt: skip
            if all("speedup_fused_graph" in r for r in enc):
                axes[0][0].plot([r["batch"] for r in enc], [r["speedup_fused_graph"] for r in enc], marker="*",
                                ls="-.", color=color, label=f"{rec['model']} + fuse_dense + graphs")  # fmt: skip
            if all("speedup_fused" in r for r in enc):
                axes[0][0].plot([r["batch"] for r in enc], [r["speedup_fused"] for r in enc], marker="P", ls="--",
                                color=color, label=f"{rec['model']} + fuse_dense")  # fmt: skip
        speedups = ("speedup", "speedup_graphs", "speedup_step_graphs")
        for key, (_, label, marker, ls) in zip(speedups, VARIANTS[1:], strict=True):
            pts = [(r["batch"], r[key]) for r in dec if r.get(key) is not None]
            if pts:
                axes[0][1].plot(*zip(*pts, strict=True), marker=marker, ls=ls, color=color,
                                label=f"{rec['model']} {label}")  # fmt: skip
        for ax, rows, variants in (
            (axes[1][0], enc, [*VARIANTS[:2], ENCODER_FUSED, ENCODER_GRAPHS]),
            (axes[1][1], dec, VARIANTS),
        ):
            for prefix, label, marker, ls in variants:
                # CPU smoke times can come out negative (a difference of noisy timings): not on a log axis.
                pts = [(r["batch"], r[f"{prefix}_x_floor"]) for r in rows if (r.get(f"{prefix}_x_floor") or 0) > 0]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, ls=ls, color=color,
                            label=f"{rec['model']} {label}")  # fmt: skip
    axes[0][0].set(xscale="log", title="encoder throughput speed-up vs HF eager")
    axes[0][1].set(xscale="log", title="decode time/token speed-up vs HF eager")
    axes[1][0].set(yscale="log", xlabel="batch (x seq tokens)", ylabel="measured / floor",
                   title="encoder forward time / floor")  # fmt: skip
    axes[1][1].set(yscale="log", xlabel="batch", ylabel="measured / floor", title="decode step time / floor")
    for ax in axes[1]:
        ax.axhline(1.0, color="k", ls="--", lw=1, label="floor")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"bf16, random weights, {result['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None, prog: str | None = None) -> int:
    p = OneLineErrorParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help=f"default: {' '.join(DEFAULT_MODELS)} ({' '.join(SMOKE_MODELS)} "
                   "with --cpu-smoke)")  # fmt: skip
    p.add_argument("--batches", nargs="+", type=int, help="encoder batches (default: 8 32 128; 2 with --cpu-smoke)")
    p.add_argument("--decode-batches", nargs="*", type=int,
                   help="default: 1 8 64 (2 with --cpu-smoke); none: encoder only")  # fmt: skip
    p.add_argument("--seq", type=int, help="encoder tokens per sequence (default: 128; 16 with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU (checks the benchmark runs)")
    p.add_argument("--out", type=json_out, default="benchmarks/results/model.json")
    args = p.parse_args(argv)
    sizes = [*(args.batches or []), *(args.decode_batches or []), *([args.seq] if args.seq is not None else [])]
    if any(n < 1 for n in sizes):
        p.error("--batches, --decode-batches and --seq must be positive")
    if args.cpu_smoke:
        device = torch.device("cpu")
        defaults = {"models": SMOKE_MODELS, "batches": [2], "decode_batches": [2], "seq": 16}
        timing = SMOKE_DECODE_TIMING
        ceilings = measure_ceilings(device, copy_numel=1 << 22, matmul_size=128)
    else:
        if not torch.cuda.is_available():
            print("error: the model benchmark needs a CUDA device (or --cpu-smoke)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        defaults = {"models": DEFAULT_MODELS, "batches": [8, 32, 128], "decode_batches": [1, 8, 64], "seq": 128}
        timing = DECODE_TIMING
        ceilings = measure_ceilings(device)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print_ceilings(ceilings, device)
    models = []
    for name in args.models:
        config = tiny_config(name) if args.cpu_smoke else None
        models.append(run_model(name, device, args.batches, args.decode_batches, ceilings, args.seq, timing, config))
        gc.collect()  # the model's memory back before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"environment": environment(), "ceilings": ceilings, "encoder_seq": args.seq, "decode_timing": timing,
              "models": models}  # fmt: skip
    save_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
