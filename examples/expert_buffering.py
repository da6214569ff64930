"""Expert buffering: keep only some experts of every MoE layer on the compute device.

Runs offline on the shipped models::

    python examples/expert_buffering.py                                   # switch-tiny-ddtp, CPU
    python examples/expert_buffering.py --model nllb --policy lru --fractions 0.25 0.5
    python examples/expert_buffering.py --device cuda --dtype bfloat16    # experts in pinned host memory
    python examples/expert_buffering.py --recipe device_map --device cuda
    python examples/expert_buffering.py --device cuda --dtype bfloat16 --backend triton \
        --cache-misses read --cuda-graphs step                          # graphed decode with a cache

``hf_moe_opt.optimize(model, expert_cache=0.25)`` keeps every expert in (pinned)
host memory, one copy, and a quarter of each layer's experts in slots on the device of the layer's
router; a step that routes to a missing expert copies it into a slot (evicting one chosen by the
policy) on a separate stream (``--cache-misses read``: a one-token step reads it from host memory
instead and the copy serves later steps). Outputs are those of the fully resident model; ``hf_moe_opt.stats``
reports hits, misses, bytes copied, copy and stall time per layer. ``--cuda-graphs step`` replays every
decode step from a CUDA graph, the fully resident reference too (with ``--cache-misses read``, batch
up to 8; the policies take each step's routing while the GPU runs the next step): on an H200,
nllb-moe-54b at half its experts resident decoded at 1.00-1.23x the graphed resident time.

Models larger than GPU memory (the recipe this example follows with ``--device cuda``)::

    import torch, hf_moe_opt
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    # 1. device map: the experts never reach the GPU, nothing is loaded twice
    with torch.device("meta"):
        skeleton = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(name))
    device_map = hf_moe_opt.cache.offload_device_map(skeleton, "cuda:0")  # experts -> "cpu", rest -> GPU
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.bfloat16, device_map=device_map)
    hf_moe_opt.optimize(model, expert_cache=0.25)   # takes accelerate's offloaded experts over

    # 2. or load on the host, then move everything but the experts
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=torch.bfloat16)
    hf_moe_opt.cache.move_dense(model, "cuda")
    hf_moe_opt.optimize(model, expert_cache="24GiB", cache_policy="lfu")

On a CPU the "device" slots are host memory as well, so the copies are plain memory copies and the
hit rates and bytes copied are the interesting numbers; on a GPU they are host-to-device copies.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.cache import DEFAULT_POLICY, POLICY_NAMES, move_dense, offload_device_map

MODELS = {"switch": "switch-tiny-ddtp", "nllb": "nllb-moe-tiny-ddtp"}

PROMPTS = {
    "switch": [
        "A small <extra_id_0> for reading and writing configuration files.",
        "Fast image viewer with <extra_id_0> for many file formats.",
        "Tools to manage the <extra_id_0> interfaces of a laptop.",
        "This package contains the <extra_id_0> for the command line tool.",
    ],
    "nllb": [
        "A small library for reading and writing configuration files.",
        "Fast image viewer with support for many file formats.",
        "Tools to manage the network interfaces of a laptop.",
        "This package contains the documentation for the command line tool.",
    ],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="switch", help="'switch', 'nllb' (shipped models) or a path / hub name")
    parser.add_argument("--device", default="cpu", help="compute device of the dense weights, e.g. cpu, cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="share of each layer's experts kept on the device",
    )
    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=list(POLICY_NAMES), help="eviction policy")
    parser.add_argument(
        "--cache-misses",
        default="copy",
        choices=["copy", "read"],
        help="a one-token step copies a missing expert in and waits, or reads it from host memory (Triton backend)",
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument(
        "--cuda-graphs",
        default="none",
        choices=["none", "step"],
        help='"step": whole decode steps from CUDA graphs (CUDA; a cache needs --cache-misses read)',
    )
    parser.add_argument(
        "--recipe",
        default="move_dense",
        choices=["move_dense", "device_map"],
        help="how the model is loaded: on the host then move_dense, or with offload_device_map",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the fully resident run (for models that do not fit on the device)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def load(path: str, args: argparse.Namespace):
    """The model with its dense weights on ``args.device`` and its experts in host memory."""
    dtype = getattr(torch, args.dtype)
    if args.recipe == "device_map":
        with torch.device("meta"):
            skeleton = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(path))
        device_map = offload_device_map(skeleton, args.device)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)
        move_dense(model, args.device)  # everything but the experts; a no-op on a CPU
    return model.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cuda_graphs == "step" and args.cache_misses != "read":
        print("error: --cuda-graphs step with an expert cache needs --cache-misses read", file=sys.stderr)
        return 2
    graphs = {"cuda_graphs": "step"} if args.cuda_graphs == "step" else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    family = args.model if args.model in MODELS else None
    path = str(shipped_model_path(MODELS[family])) if family else args.model
    prompts = PROMPTS[family or ("nllb" if "nllb" in path.lower() else "switch")][: max(1, args.num_prompts)]
    tok = AutoTokenizer.from_pretrained(path)

    def generate_all(model):
        """Greedy generation, one request at a time (batch 1 decode, where buffering matters most)."""
        outs = []
        start = time.perf_counter()
        for text in prompts:
            batch = tok([text], return_tensors="pt").to(args.device)
            with torch.no_grad():
                outs.append(model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False))
        return outs, time.perf_counter() - start

    reference, t_resident = None, None
    if not args.no_reference:
        # Reference: the same model with every expert resident (a model larger than the GPU has no
        # such run; this one is small, so the buffered runs are checked token for token).
        resident = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device)
        hf_moe_opt.optimize(resident.eval(), backend=args.backend, **graphs)
        generate_all(resident)  # warm-up
        reference, t_resident = generate_all(resident)
        del resident
    model = load(path, args)
    print(
        f"{path} ({args.device}, {args.dtype}), policy {args.policy!r}, {len(prompts)} prompts, "
        f"{args.max_new_tokens} new tokens each, loaded with the {args.recipe!r} recipe"
        + (", decode steps from CUDA graphs" if graphs else "")
    )
    if reference is not None:
        print(f"fully resident: {t_resident * 1e3:.1f} ms")
        print(f"decoded: {tok.decode(reference[0][0], skip_special_tokens=False)!r}")

    for fraction in args.fractions:
        with warnings.catch_warnings():
            if torch.device(args.device).type == "cpu":  # no page-locked memory without an accelerator
                warnings.filterwarnings("ignore", message=".*pinned.*", category=RuntimeWarning)
            hf_moe_opt.optimize(
                model, backend=args.backend, expert_cache=fraction, cache_policy=args.policy,
                cache_misses=args.cache_misses, **graphs,
            )  # fmt: skip
        outs, elapsed = generate_all(model)
        same = reference is None or all(torch.equal(a, b) for a, b in zip(outs, reference, strict=True))
        stats = hf_moe_opt.stats(model)
        check = "" if reference is None else f", tokens identical to fully resident: {same}"
        print(f"\nexpert_cache={fraction}: {elapsed * 1e3:.1f} ms{check}")
        print(
            f"  {'layer':34s} {'slots':>5s} {'hits':>5s} {'misses':>6s} {'hit rate':>8s} "
            f"{'MiB copied':>10s} {'copy ms':>8s} {'stall ms':>8s}  resident"
        )
        total_hits = total_access = total_bytes = 0
        for name, st in stats.items():
            total_hits += st["hits"]
            total_access += st["hits"] + st["misses"]
            total_bytes += st["bytes_copied"]
            print(
                f"  {name:34s} {st['num_slots']:5d} {st['hits']:5d} {st['misses']:6d} {st['hit_rate']:8.2f} "
                f"{st['bytes_copied'] / 2**20:10.2f} {st['copy_time_ms']:8.2f} {st['stall_time_ms']:8.2f}  "
                f"{st['resident']}"
            )
        rate = total_hits / total_access if total_access else 0.0
        line = f"  all layers: hit rate {rate:.2f}, {total_bytes / 2**20:.2f} MiB copied"
        if args.cache_misses == "read":  # assignments computed straight from host memory
            line += f", host reads {sum(st['host_reads'] for st in stats.values())}"
        print(line)
        hf_moe_opt.restore(model)  # experts back to host memory, slots freed
        if not same and args.dtype == "float32":
            print("float32 tokens differ from the fully resident run", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
