"""Perplexity of the original and the optimized model on the same text (``hf-moe-opt eval-lm``).

* Encoder-decoder (Switch Transformers): teacher-forced T5 span-corruption denoising. Each text is
  tokenized without special tokens, cut to ``--max-length`` tokens (texts under 4 tokens are skipped),
  corrupted with noise density 0.15 and mean span length 3 by a numpy generator seeded with
  ``--corruption-seed`` (consumed text by text, in data order), and ``</s>`` is appended to the input
  and the target. With the defaults (112 tokens, seed 1234) this is the evaluation that produced the
  shipped ``switch-tiny-ddtp``'s ``metrics.json``. Perplexity = exp(mean NLL over the target tokens,
  sentinels and ``</s>`` included). Greedy generations on the first ``--generate-samples`` corrupted
  inputs are compared token by token.
* Causal LMs: the texts joined by blank lines, scored with a window of ``--max-length`` tokens moved by
  ``--stride`` tokens; each window scores only the tokens no earlier window scored. Greedy
  continuations of the first ``--generate-samples`` texts (prompt: each text's first
  ``CAUSAL_PROMPT_TOKENS`` tokens as the tokenizer encodes it, special tokens such as BOS included;
  one prompt a ``generate`` call, so no padding) are compared token by token.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .common import (
    DataSpec,
    DropCounter,
    EvalError,
    PeakMemory,
    Stopwatch,
    check_positive,
    length_batches,
    load_model,
    model_kind,
    pad,
    read_data,
)
from .compare import (
    TeacherForcedBatch,
    TeacherForcedResult,
    compare_generations,
    compare_teacher_forced,
    generate_batches,
    iterate_phases,
    model_memory,
    plan_phases,
    ppl_within_tolerance,
    teacher_forced,
)
from .report import RunSetup, finish_report, setup_run

DEFAULT_MODEL = "switch-tiny-ddtp"
DEFAULT_DATA = "en.test.txt.gz"
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
MIN_TOKENS = 4
CAUSAL_PROMPT_TOKENS = 16


# ----------------------------------------------------------------------------- span corruption
def _random_split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items cut into ``parts`` non-empty runs at random; the run lengths."""
    boundary = np.zeros(total, dtype=bool)
    boundary[1:][rng.permutation(total - 1)[: parts - 1]] = True
    return np.bincount(np.cumsum(boundary), minlength=parts)


def noise_mask(length: int, rng: np.random.Generator, max_spans: int) -> np.ndarray:
    """T5's random spans: ``round(0.15 * length)`` noise tokens in ``round(noise / 3)`` spans, alternating
    with kept runs, a kept run first."""
    noise = min(max(int(round(length * NOISE_DENSITY)), 1), length - 1)
    spans = min(max(int(round(noise / MEAN_SPAN)), 1), max_spans)
    spans = min(spans, noise, length - noise)
    noise_runs = _random_split(noise, spans, rng)
    kept_runs = _random_split(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    start = 0
    for kept, noisy in zip(kept_runs, noise_runs, strict=True):
        start += kept
        mask[start : start + noisy] = True
        start += noisy
    return mask


def corrupt(ids: Sequence[int], rng: np.random.Generator, sentinels: Sequence[int], eos: int):
    """``(encoder input, target)``: each noise span replaced by the next sentinel in the input; the
    target lists each sentinel followed by the span it hides. Both end with ``eos``."""
    mask = noise_mask(len(ids), rng, len(sentinels))
    inputs: list[int] = []
    target: list[int] = []
    span = -1
    for i, (tok, noisy) in enumerate(zip(ids, mask, strict=True)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                inputs.append(sentinels[span])
                target.append(sentinels[span])
            target.append(tok)
        else:
            inputs.append(tok)
    return inputs + [eos], target + [eos]


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as far as the tokenizer has them."""
    unk = tokenizer.unk_token_id
    ids = []
    for i in range(1000):
        tid = tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")
        if tid is None or tid == unk:
            break
        ids.append(tid)
    if not ids:
        raise EvalError("the tokenizer has no T5 sentinel tokens (<extra_id_0>...): span corruption needs them")
    return ids


def span_corruption_pairs(texts: Sequence[str], tokenizer, max_length: int, seed: int) -> list[tuple[list, list]]:
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = [e[:max_length] for e in encoded if len(e[:max_length]) >= MIN_TOKENS]
    if not ids:
        raise EvalError(f"no text has at least {MIN_TOKENS} tokens")
    sentinels = sentinel_ids(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise EvalError("the tokenizer has no EOS token")
    rng = np.random.default_rng(seed)
    return [corrupt(s, rng, sentinels, eos) for s in ids]


SEQ2SEQ_BATCH = 64
CORRUPTION_SEED = 1234


def seq2seq_batches(pairs: Sequence[tuple[list, list]], batch_size: int, pad_id: int) -> list[TeacherForcedBatch]:
    out = []
    for idx in length_batches([len(p[0]) for p in pairs], batch_size):
        input_ids = pad([pairs[i][0] for i in idx], pad_id)
        labels = pad([pairs[i][1] for i in idx], -100)
        out.append(TeacherForcedBatch(idx, input_ids, (input_ids != pad_id).long(), labels))
    return out


# ----------------------------------------------------------------------------- causal LMs
def strided_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position)`` of each window (``stride < window``).

    The first window scores positions ``1 .. window-1``; each next one scores the following ``stride``
    positions with the ``window - stride`` (or more) tokens before them as context. Every position from
    1 on is scored exactly once.
    """
    if not 0 < stride < window:
        raise EvalError(f"the stride ({stride}) must be positive and smaller than the window ({window})")
    end = min(window, num_tokens)
    windows = [(0, end, 1)] if end > 1 else []
    while end < num_tokens:
        first = end
        end = min(first + stride, num_tokens)
        windows.append((max(0, end - window), end, first))
    return windows


def causal_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    window: int,
    stride: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> TeacherForcedResult:
    """Strided-window perplexity of one long token stream; results keyed by window number."""
    result = TeacherForcedResult()
    clock = Stopwatch(device)
    meter = PeakMemory(device)
    windows = strided_windows(ids.numel(), window, stride)
    with torch.no_grad(), meter:
        for w, (begin, end, first) in enumerate(
            tqdm(windows, desc=desc, unit="window", disable=not progress, dynamic_ncols=True, leave=False)
        ):
            chunk = ids[begin:end].unsqueeze(0).to(device)
            with clock.time():
                logits = model(input_ids=chunk).logits
            logp = F.log_softmax(logits[0, first - begin - 1 : end - begin - 1].float(), dim=-1).cpu()
            target = ids[first:end]
            result.token_nll[w] = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()
            result.argmax[w] = logp.argmax(dim=-1)
            result.tokens_scored += end - first
            result.tokens_processed += end - begin
    result.seconds = clock.seconds
    result.peak_bytes = meter.peak_bytes
    result.memory_method = meter.method
    return result


def causal_prompts(texts: Sequence[str], tokenizer, count: int) -> list[list[int]]:
    """The first ``CAUSAL_PROMPT_TOKENS`` tokens of each of the first ``count`` texts (special tokens kept)."""
    prompts = []
    for text in texts[:count]:
        ids = tokenizer(text)["input_ids"][:CAUSAL_PROMPT_TOKENS]
        if ids:
            prompts.append(ids)
    return prompts


def causal_generations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    device: torch.device,
    max_new_tokens: int,
    pad_id: int | None,
    desc: str,
    progress: bool = True,
) -> tuple[dict[int, list[int]], float, int]:
    """Greedy continuation of each prompt, one ``generate`` call each; ``(new tokens per index, seconds,
    generated tokens)``. Padding after an early EOS is removed."""
    outputs: dict[int, list[int]] = {}
    clock = Stopwatch(device)
    new_tokens = 0
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if pad_id is not None:
        kwargs["pad_token_id"] = pad_id
    with torch.no_grad():
        for i, prompt in enumerate(tqdm(prompts, desc=desc, unit="text", disable=not progress, leave=False)):
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            with clock.time():
                gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            row = gen[0, input_ids.shape[1] :].tolist()
            while row and pad_id is not None and row[-1] == pad_id:
                row.pop()
            outputs[i] = row
            new_tokens += len(row)
    return outputs, clock.seconds, new_tokens


# ----------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .report import add_common_arguments

    add_common_arguments(
        parser,
        default_model=DEFAULT_MODEL,
        default_data=DEFAULT_DATA,
        batch_size=None,
        batch_help=f"texts per forward, seq2seq models (default {SEQ2SEQ_BATCH}); causal models: one window",
    )
    g = parser.add_argument_group("perplexity")
    g.add_argument("--text-field", default="text", help="JSON-lines / datasets field (TSV: column number)")
    g.add_argument("--max-length", type=int, default=112, help="tokens per text (seq2seq) / window (causal)")
    seed_help = f"span-corruption seed, seq2seq models (default {CORRUPTION_SEED})"
    g.add_argument("--corruption-seed", type=int, default=None, help=seed_help)
    g.add_argument("--stride", type=int, default=None, help="window stride, causal models (default: max-length / 2)")
    g.add_argument("--generate-samples", type=int, default=32, help="greedy generations compared (0: none)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens per compared generation")


def _check_options_apply(args: argparse.Namespace, kind: str) -> None:
    """Options of the other model kind are refused, not ignored; defaults filled in for the report."""
    other = {"seq2seq": ("--stride", args.stride), "causal": ("--batch-size", args.batch_size)}[kind]
    given = [other] + ([("--corruption-seed", args.corruption_seed)] if kind == "causal" else [])
    for option, value in given:
        if value is not None:
            how = "span corruption" if kind == "seq2seq" else "strided windows, one per forward"
            raise EvalError(f"{option} does not apply to {kind} models (scored by {how})")
    if kind == "seq2seq":
        args.batch_size = args.batch_size or SEQ2SEQ_BATCH
        args.corruption_seed = CORRUPTION_SEED if args.corruption_seed is None else args.corruption_seed
    else:
        args.batch_size = 1  # recorded in the report: one window per forward


def run(args: argparse.Namespace) -> dict:
    """Evaluate; returns the report (also printed / written by the caller)."""
    check_positive("--max-length", args.max_length)
    check_positive("--stride", args.stride)
    check_positive("--max-new-tokens", args.max_new_tokens)
    if args.generate_samples < 0:
        raise EvalError(f"--generate-samples must be >= 0, got {args.generate_samples}")
    setup: RunSetup = setup_run(
        args,
        DEFAULT_DATA,
        lambda spec: DataSpec(**spec, text_field=args.text_field),
        check_model=lambda source: _check_options_apply(args, model_kind(source)),
    )
    kind = model_kind(setup.model_source)
    texts = read_data(setup.data, pairs=False)
    model, tokenizer = load_model(setup.model_source, kind, setup.dtype, setup.device)
    phases, baseline, notes = plan_phases(model)
    results: dict[str, TeacherForcedResult] = {}
    generations: dict[str, dict] = {}
    gen_stats: dict[str, dict] = {}
    drops = None
    extra: dict = {}

    if kind == "seq2seq":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
        pairs = span_corruption_pairs(texts, tokenizer, args.max_length, args.corruption_seed)
        batches = seq2seq_batches(pairs, args.batch_size, pad_id)
        n_gen = min(args.generate_samples, len(pairs))
        gen_sources = [pairs[i][0] for i in range(n_gen)]
        gen_order = length_batches([len(s) for s in gen_sources], args.batch_size)
        task = {
            "objective": "teacher-forced T5 span corruption (noise density 0.15, mean span 3)",
            "max_length": args.max_length,
            "corruption_seed": args.corruption_seed,
            "texts": len(texts),
            "sequences": len(pairs),
            "target_tokens": sum(len(p[1]) for p in pairs),
            "generation_check": {"samples": n_gen, "max_new_tokens": args.max_new_tokens, "decoding": "greedy"},
        }
        for phase in iterate_phases(model, phases, args.capacity, args.backend):
            counter = DropCounter(model) if phase.name == baseline else None
            try:
                results[phase.name] = teacher_forced(
                    model, batches, setup.device, f"{phase.name} ppl", counter, setup.progress
                )
            finally:
                if counter is not None:
                    counter.remove()
            if counter is not None:
                drops = counter.summary()
            if n_gen:
                out, secs, new_tokens, _, _ = generate_batches(
                    model,
                    gen_sources,
                    gen_order,
                    pad_id,
                    setup.device,
                    lambda _ids: {"max_new_tokens": args.max_new_tokens, "do_sample": False, "num_beams": 1},
                    f"{phase.name} generate",
                    setup.progress,
                )
                generations[phase.name] = out
                gen_stats[phase.name] = {"seconds": secs, "new_tokens": new_tokens}
            extra.setdefault("weight_bytes", {})[phase.name] = model_memory(model)
    else:
        stride = args.stride or max(args.max_length // 2, 1)
        if stride >= args.max_length:
            raise EvalError(f"--stride ({stride}) must be smaller than --max-length ({args.max_length})")
        joined = "\n\n".join(texts)
        ids = torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.numel() < 2:
            raise EvalError("the data tokenizes to fewer than 2 tokens")
        prompts = causal_prompts(texts, tokenizer, args.generate_samples)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        task = {
            "objective": "causal LM, strided window",
            "window": args.max_length,
            "stride": stride,
            "texts": len(texts),
            "tokens": int(ids.numel()),
            "generation_check": {
                "samples": len(prompts),
                "prompt": f"first {CAUSAL_PROMPT_TOKENS} tokens of each text (tokenizer's special tokens included)",
                "max_new_tokens": args.max_new_tokens,
                "decoding": "greedy",
            },
        }
        for phase in iterate_phases(model, phases, args.capacity, args.backend):
            results[phase.name] = causal_perplexity(
                model, ids, args.max_length, stride, setup.device, f"{phase.name} ppl", setup.progress
            )
            if prompts:
                out, secs, new_tokens = causal_generations(
                    model, prompts, setup.device, args.max_new_tokens, pad_id, f"{phase.name} generate", setup.progress
                )
                generations[phase.name] = out
                gen_stats[phase.name] = {"seconds": secs, "new_tokens": new_tokens}
            extra.setdefault("weight_bytes", {})[phase.name] = model_memory(model)

    phase_reports = {}
    for phase in phases:
        r = results[phase.name]
        rep = {
            "description": phase.description,
            "perplexity": r.perplexity,
            "nll_sum": r.nll_sum,
            "tokens_scored": r.tokens_scored,
            "tokens_processed": r.tokens_processed,
            "seconds": r.seconds,
            "tokens_per_second": r.tokens_processed / r.seconds if r.seconds > 0 else math.nan,
            "peak_memory_bytes": r.peak_bytes,
            "memory_method": r.memory_method,
            "weight_bytes": extra["weight_bytes"][phase.name],
        }
        if phase.name in gen_stats:
            rep["generation"] = gen_stats[phase.name]
        phase_reports[phase.name] = rep

    comparisons = {}
    for phase in phases:
        if phase.name == baseline:
            continue
        # As eval-mt: "changed only where the original drops" is the capacity="none" question.
        drops_known = drops is not None and args.capacity == "none" and phase.name == "optimized"
        cmp = compare_teacher_forced(results[phase.name], results[baseline], setup.dtype, drops_known)
        if phase.name in generations:
            cmp["generation"] = compare_generations(generations[phase.name], generations[baseline])
        comparisons[f"{phase.name}_vs_{baseline}"] = cmp
    if "reference" in results:
        cmp = compare_teacher_forced(results["optimized"], results["original"], setup.dtype, False)
        if "optimized" in generations:
            cmp["generation"] = compare_generations(generations["optimized"], generations["original"])
        comparisons["optimized_vs_original"] = cmp

    verdict_cmp = comparisons[f"optimized_vs_{baseline}"]
    verdict = unchanged_verdict(verdict_cmp, args.capacity, setup.dtype, baseline)
    return finish_report(
        setup,
        task_name="lm_perplexity",
        task=task,
        phases=phase_reports,
        baseline=baseline,
        comparisons=comparisons,
        verdict=verdict,
        drops=drops,
        notes=notes,
    )


def unchanged_verdict(cmp: dict, capacity: str, dtype: torch.dtype, baseline: str) -> dict:
    """The "unchanged" rule for perplexity runs (see :func:`hf_moe_opt.evaluation.report.UNCHANGED_RULES`)."""
    from .common import PPL_RTOL

    gen = cmp.get("generation")
    ppl_ok = ppl_within_tolerance(cmp["perplexity_rel_diff"], dtype)
    gen_ok = gen is None or gen["all_identical"]
    out = {
        "against": baseline,
        "capacity": capacity,
        "perplexity_rel_tolerance": PPL_RTOL[dtype],
        "perplexity_within_tolerance": ppl_ok,
        "generated_tokens_identical": None if gen is None else gen["all_identical"],
    }
    if gen is not None:
        out["generations"] = gen["sequences"]
        out["generations_differing"] = gen["sequences"] - gen["identical_sequences"]
    if capacity == "model":
        # A corpus perplexity hides one changed sequence among thousands: every token counts too.
        out["sequences_changed"] = cmp["sequences_changed"]
        out["token_nll_atol"] = cmp["token_nll_atol"]
        out["unchanged"] = bool(ppl_ok and gen_ok and cmp["sequences_changed"] == 0)
    else:
        out["unchanged"] = bool(ppl_ok and gen_ok)
        if "sequences_changed_without_any_drop" in cmp:
            out["changes_only_where_original_drops"] = cmp["sequences_changed_without_any_drop"] == 0
    return out
