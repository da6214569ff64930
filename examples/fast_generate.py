"""Translation-style ``generate`` calls: ``optimize`` alone, then (on CUDA) the encoder pass and every
decode step replayed from CUDA graphs, greedy or with beam search.

Runs offline on the shipped models::

    python examples/fast_generate.py                                      # switch-tiny-ddtp on the CPU
    python examples/fast_generate.py --model nllb --device cuda --num-beams 4
    python examples/fast_generate.py --model google/switch-base-128 --device cuda --dtype bfloat16 --batch 8

For each setting it prints the median time of one ``generate`` call and whether it returned the tokens
of plain ``optimize()``. CUDA graphs need a CUDA device (and, for NLLB-MoE, transformers >= 5.24); on
a CPU the script shows ``optimize()`` and ``fuse_dense`` only. ``fuse_dense`` agrees with the unfused
model to rounding: in float32 the tokens match; in bfloat16 a near tie between two tokens may go the
other way.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.timing import median_ms

SHIPPED = {"switch": "switch-tiny-ddtp", "nllb": "nllb-moe-tiny-ddtp"}
SENTENCES = [
    "A small library for reading and writing configuration files.",
    "Fast image viewer with support for many file formats.",
    "The server sends a message to every client when the database changes.",
]
GRAPHED = {"fuse_dense": True, "cuda_graphs": ("encoder", "step")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="switch", help="switch, nllb (shipped) or a hub name / path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = str(shipped_model_path(SHIPPED[args.model])) if args.model in SHIPPED else args.model
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    batch = dict(tok(texts, return_tensors="pt", padding=True).to(args.device))
    options = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
    translator = model.config.model_type == "nllb-moe"
    if translator:
        options["forced_bos_token_id"] = tok.convert_tokens_to_ids("deu_Latn")  # translate into German

    settings = [("optimize()", {}), ("optimize(fuse_dense=True)", {"fuse_dense": True})]
    if torch.device(args.device).type == "cuda":
        settings.append(('optimize(fuse_dense=True, cuda_graphs=("encoder", "step"))', GRAPHED))
    else:
        print('(CUDA graphs need a CUDA device: run with --device cuda to see cuda_graphs=("encoder", "step"))')
    reference = None
    for label, kwargs in settings:
        try:
            hf_moe_opt.optimize(model, **kwargs)
        except ValueError as err:  # e.g. NLLB-MoE's graphs before transformers 5.24
            print(f"{label}: not available here ({err})")
            continue
        with torch.no_grad():
            out = model.generate(**batch, **options)
            ms = median_ms(lambda: model.generate(**batch, **options), batch["input_ids"].device, args.repeats, 1)
        hf_moe_opt.restore(model)
        reference = out if reference is None else reference
        same = out.shape == reference.shape and bool(torch.equal(out, reference))
        print(f"{label}: {ms:.1f} ms per generate call; same tokens as optimize(): {same}")
    if translator:
        print("first translation:", tok.decode(reference[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
