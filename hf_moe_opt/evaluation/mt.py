"""BLEU and chrF of the original and the optimized model on the same sources (``hf-moe-opt eval-mt``).

Each phase translates every source (greedy by default, ``--num-beams`` for beam search; sources sorted
by length, ``--batch-size`` a batch) and scores the detokenized outputs with sacrebleu's corpus BLEU
and chrF (through ``evaluate`` when its metric scripts are cached locally or ``--metrics evaluate``
allows downloading them, else sacrebleu directly: same numbers). It also scores the references
teacher-forced (perplexity; dropped-token share) and compares generated token ids sentence by
sentence. The target is ``[forced BOS] + tokens + [EOS]`` after the decoder start token, as the
shipped model was trained.
"""

from __future__ import annotations

import argparse
import math
import re

import torch

from .common import DataSpec, DropCounter, EvalError, check_positive, length_batches, load_model, model_kind, pad
from .compare import (
    TeacherForcedBatch,
    TeacherForcedResult,
    compare_generations,
    compare_teacher_forced,
    float32_weights,
    generate_batches,
    iterate_phases,
    model_memory,
    plan_phases,
    ppl_within_tolerance,
    teacher_forced,
)
from .report import RunSetup, finish_report, setup_run

DEFAULT_MODEL = "nllb-moe-tiny-ddtp"
DEFAULT_DATA = "en-de.test.tsv.gz"
METRIC_BACKENDS = ("auto", "evaluate", "sacrebleu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .report import add_common_arguments

    add_common_arguments(parser, default_model=DEFAULT_MODEL, default_data=DEFAULT_DATA, batch_size=48)
    g = parser.add_argument_group("translation")
    g.add_argument("--source-field", default="source", help="JSON-lines / datasets source field")
    g.add_argument("--target-field", default="target", help="JSON-lines / datasets target field")
    g.add_argument("--source-lang", help="source language code of the tokenizer (NLLB: e.g. eng_Latn)")
    g.add_argument("--target-lang", help="target language code: forced BOS token (default: the model's)")
    g.add_argument(
        "--translation-keys",
        nargs=2,
        metavar=("SRC", "TGT"),
        help="keys of 'translation' records (e.g. en de; default: --source-lang/--target-lang)",
    )
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default min(400, 1.6 x padded source length + 10)")
    g.add_argument("--max-source-length", type=int, default=386, help="source tokens incl. language tag and EOS")
    g.add_argument(
        "--metrics",
        default="auto",
        help="auto: evaluate's scripts if cached locally, else sacrebleu (same numbers); "
        "evaluate: may download its scripts; sacrebleu: sacrebleu directly",
    )
    g.add_argument(
        "--no-float32-check",
        dest="float32_check",
        action="store_false",
        help="bfloat16/float16: when translations differ, do not re-run the baseline and the optimized model "
        "in float32 to tell rounding from a change (the re-run holds the weights in float32 meanwhile)",
    )


# ----------------------------------------------------------------------------- metrics
def _evaluate_metric(name: str, allow_download: bool):
    import evaluate
    from evaluate.utils.file_utils import DownloadConfig

    config = None if allow_download else DownloadConfig(local_files_only=True)
    return evaluate.load(name, download_config=config)


def corpus_scores(hyps: list[str], refs: list[str], backend: str) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults); ``backend`` auto / evaluate / sacrebleu."""
    reason = ""
    if backend in ("auto", "evaluate"):
        try:
            bleu = _evaluate_metric("sacrebleu", backend == "evaluate")
            chrf = _evaluate_metric("chrf", backend == "evaluate")
        except ImportError as e:
            if backend == "evaluate":
                raise EvalError("--metrics evaluate needs the `evaluate` package (pip install evaluate)") from e
            reason = " (`evaluate` not installed)"
        except Exception as e:  # offline without cached metric scripts, or a failed download
            reason = " (evaluate's metric scripts not cached; not downloaded)"
            if backend == "evaluate":
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EvalError(f"evaluate could not load sacrebleu/chrf: {first}") from e
        else:
            b = bleu.compute(predictions=hyps, references=[[r] for r in refs])
            c = chrf.compute(predictions=hyps, references=[[r] for r in refs])
            return {"bleu": float(b["score"]), "chrf": float(c["score"]), "metrics_backend": "evaluate"}
    try:
        import sacrebleu
    except ImportError as e:
        raise EvalError("BLEU/chrF need the `sacrebleu` package (pip install sacrebleu)") from e
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    b = bleu_metric.corpus_score(hyps, [refs])
    c = chrf_metric.corpus_score(hyps, [refs])
    return {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "metrics_backend": "sacrebleu" + reason,
        "bleu_signature": str(bleu_metric.get_signature()),
        "chrf_signature": str(chrf_metric.get_signature()),
    }


# ----------------------------------------------------------------------------- data
_LANG_CODE = re.compile(r"[a-z]{2,3}_[A-Z][a-z]{3}")  # NLLB's codes: eng_Latn, deu_Latn


def _token_id(tokenizer, token: str, what: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise EvalError(f"{what} {token!r} is not a token of the tokenizer")
    return int(tid)


def _check_language_code(tokenizer, code: str | None, what: str) -> None:
    """A multilingual tokenizer's language code is one of its special tokens ('deu_Latn'); a subword
    that happens to be spelled like an ISO code ('de') would be used silently otherwise."""
    codes = [t for t in tokenizer.all_special_tokens if _LANG_CODE.fullmatch(t)]
    if code and codes and code not in codes:
        examples = codes[:3]
        raise EvalError(
            f"{what} {code!r} is not a language code of this tokenizer (codes look like {examples}); "
            "for 'translation' records keyed by other names pass --translation-keys SRC TGT"
        )


def _with_source_code(tokenizer, sources: list[list[int]], code: str) -> list[list[int]]:
    """Sources whose leading language code is ``code``: a tokenizer without a ``src_lang`` setting
    (a fast tokenizer saved with a fixed template) prefixes the code it was saved with."""
    codes = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens if _LANG_CODE.fullmatch(t)}
    if not all(ids and ids[0] in codes for ids in sources):
        raise EvalError(
            f"--source-lang {code}: this tokenizer has no src_lang setting and its sources do not start with "
            "a language code to replace"
        )
    wanted = _token_id(tokenizer, code, "--source-lang")
    return [[wanted, *ids[1:]] for ids in sources]


def prepare(tokenizer, model, pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """Token ids of sources and targets, and the ids generation needs."""
    _check_language_code(tokenizer, args.source_lang, "--source-lang")
    _check_language_code(tokenizer, args.target_lang, "--target-lang")
    if args.source_lang and hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = args.source_lang
    gen_config = model.generation_config
    forced_bos = (
        _token_id(tokenizer, args.target_lang, "--target-lang")
        if args.target_lang
        else getattr(gen_config, "forced_bos_token_id", None)
    )
    start = getattr(gen_config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    if start is None or eos is None or pad_id is None:
        raise EvalError("the model/tokenizer define no decoder start, EOS or padding token")
    enc = tokenizer([s for s, _ in pairs], truncation=True, max_length=args.max_source_length)["input_ids"]
    if args.source_lang and not hasattr(tokenizer, "src_lang"):
        enc = _with_source_code(tokenizer, enc, args.source_lang)
    body = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    prefix = [forced_bos] if forced_bos is not None else []
    targets = [prefix + t[: args.max_source_length] + [eos] for t in body]
    return {"sources": enc, "targets": targets, "start": start, "eos": eos, "pad": pad_id, "forced_bos": forced_bos}


def scoring_batches(prep: dict, batch_size: int) -> list[TeacherForcedBatch]:
    src, tgt, pad_id = prep["sources"], prep["targets"], prep["pad"]
    out = []
    for idx in length_batches([max(len(src[i]), len(tgt[i])) for i in range(len(src))], batch_size):
        input_ids = pad([src[i] for i in idx], pad_id)
        labels = pad([tgt[i] for i in idx], -100)
        decoder_input_ids = pad([[prep["start"]] + tgt[i][:-1] for i in idx], pad_id)
        out.append(
            TeacherForcedBatch(
                idx,
                input_ids,
                (input_ids != pad_id).long(),
                labels,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=(labels != -100).long(),
            )
        )
    return out


def float32_verdict(
    results32: dict[str, TeacherForcedResult],
    generations32: dict[str, dict],
    scores32: dict[str, dict],
    generations: dict[str, dict],
    phase_reports: dict[str, dict],
    baseline: str,
) -> dict:
    """The float32 re-run's part of the verdict: whether the low-precision differences are rounding.

    They are when the baseline and the optimized model agree in float32 (identical translations,
    perplexity within the float32 tolerance). The noise floor: how many of the baseline's own
    translations change between float32 and the evaluated dtype.
    """
    cmp = compare_teacher_forced(results32["optimized"], results32[baseline], torch.float32, False)
    gen = compare_generations(generations32["optimized"], generations32[baseline])
    n = gen["sequences"]

    def differing(name: str) -> int:
        return n - compare_generations(generations[name], generations32[name])["identical_sequences"]

    check = {
        "what": f"{baseline} and optimized re-run with float32 weights on the same data",
        "perplexity_rel_diff": cmp["perplexity_rel_diff"],
        "perplexity_within_tolerance": ppl_within_tolerance(cmp["perplexity_rel_diff"], torch.float32),
        "sentences_differing": n - gen["identical_sequences"],
        "bleu": {baseline: scores32[baseline]["bleu"], "optimized": scores32["optimized"]["bleu"]},
        # The noise floor: the evaluated dtype against float32, for each model alone.
        f"{baseline}_sentences_differing_from_its_float32_run": differing(baseline),
        "optimized_sentences_differing_from_its_float32_run": differing("optimized"),
        f"{baseline}_bleu_diff_from_its_float32_run": phase_reports[baseline]["bleu"] - scores32[baseline]["bleu"],
    }
    rounding = bool(check["perplexity_within_tolerance"] and gen["all_identical"])
    return {"float32_check": check, "differences_are_rounding": rounding}


# ----------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> dict:
    check_positive("--num-beams", args.num_beams)
    check_positive("--max-new-tokens", args.max_new_tokens)
    check_positive("--max-source-length", args.max_source_length)
    if args.metrics not in METRIC_BACKENDS:
        raise EvalError(f"unknown --metrics {args.metrics!r}; choose one of {', '.join(METRIC_BACKENDS)}")
    if args.metrics == "sacrebleu":
        try:
            import sacrebleu  # noqa: F401
        except ImportError as e:
            raise EvalError("BLEU/chrF need the `sacrebleu` package (pip install sacrebleu)") from e

    def make_spec(spec: dict) -> DataSpec:
        return DataSpec(
            **spec,
            source_field=args.source_field,
            target_field=args.target_field,
            source_lang=args.translation_keys[0] if args.translation_keys else args.source_lang,
            target_lang=args.translation_keys[1] if args.translation_keys else args.target_lang,
        )

    setup: RunSetup = setup_run(args, DEFAULT_DATA, make_spec)
    from .common import read_data

    pairs = read_data(setup.data, pairs=True)
    if model_kind(setup.model_source) != "seq2seq":
        raise EvalError(f"{args.model} is not an encoder-decoder model; eval-mt needs a translation model")
    model, tokenizer = load_model(setup.model_source, "seq2seq", setup.dtype, setup.device)
    prep = prepare(tokenizer, model, pairs, args)
    batches = scoring_batches(prep, args.batch_size)
    gen_order = length_batches([len(s) for s in prep["sources"]], args.batch_size)
    refs = [t for _, t in pairs]

    def gen_kwargs(input_ids: torch.Tensor) -> dict:
        max_new = args.max_new_tokens or min(400, int(1.6 * input_ids.shape[1]) + 10)
        kw = {"max_new_tokens": max_new, "num_beams": args.num_beams, "do_sample": False}
        kw["decoder_start_token_id"] = prep["start"]
        if prep["forced_bos"] is not None:
            kw["forced_bos_token_id"] = prep["forced_bos"]
        return kw

    phases, baseline, notes = plan_phases(model)
    modes = (args.capacity, args.backend)
    results: dict[str, TeacherForcedResult] = {}
    generations: dict[str, dict] = {}
    phase_reports: dict[str, dict] = {}
    results32: dict[str, TeacherForcedResult] = {}
    generations32: dict[str, dict] = {}
    scores32: dict[str, dict] = {}
    timings: dict[str, tuple] = {}
    drops = None

    def translate(name: str, suffix: str, counter: DropCounter | None) -> tuple[TeacherForcedResult, dict, dict]:
        """Teacher-forced scores, translations and BLEU/chrF of the model as it is set up now."""
        tf = teacher_forced(model, batches, setup.device, f"{name}{suffix} score", counter, setup.progress)
        out, secs, new_tokens, gen_peak, _ = generate_batches(
            model,
            prep["sources"],
            gen_order,
            prep["pad"],
            setup.device,
            gen_kwargs,
            f"{name}{suffix} translate",
            setup.progress,
        )
        timings[name + suffix] = (secs, new_tokens, gen_peak)
        hyps = [tokenizer.decode(out[i], skip_special_tokens=True).strip() for i in range(len(pairs))]
        return tf, out, corpus_scores(hyps, refs, args.metrics)

    for phase in iterate_phases(model, phases, *modes):
        counter = DropCounter(model) if phase.name == baseline else None
        try:
            tf, out, scores = translate(phase.name, "", counter)
        finally:
            if counter is not None:
                counter.remove()
        if counter is not None:
            drops = counter.summary()
        results[phase.name] = tf
        generations[phase.name] = out
        secs, new_tokens, gen_peak = timings[phase.name]
        phase_reports[phase.name] = {
            "description": phase.description,
            "bleu": scores["bleu"],
            "chrf": scores["chrf"],
            "metrics_backend": scores["metrics_backend"],
            **{k: v for k, v in scores.items() if k.endswith("signature")},
            "perplexity": tf.perplexity,
            "tokens_scored": tf.tokens_scored,
            "tokens_processed": tf.tokens_processed,
            "seconds": tf.seconds,
            "tokens_per_second": tf.tokens_processed / tf.seconds if tf.seconds > 0 else math.nan,
            "peak_memory_bytes": tf.peak_bytes,
            "memory_method": tf.memory_method,
            "generate_seconds": secs,
            "generated_tokens": new_tokens,
            "generated_tokens_per_second": new_tokens / secs if secs > 0 else math.nan,
            "sentences_per_second": len(pairs) / secs if secs > 0 else math.nan,
            "generate_peak_memory_bytes": gen_peak,
            "weight_bytes": model_memory(model),
        }

    def compare(a: str, b: str, drops_known: bool) -> dict:
        cmp = compare_teacher_forced(results[a], results[b], setup.dtype, drops_known)
        cmp["bleu_diff"] = phase_reports[a]["bleu"] - phase_reports[b]["bleu"]
        cmp["chrf_diff"] = phase_reports[a]["chrf"] - phase_reports[b]["chrf"]
        cmp["generation"] = compare_generations(generations[a], generations[b])
        return cmp

    # Changes "only where the original drops" is the capacity="none" question; with capacity="model"
    # every change is unexplained, and reporting them as "changed without a drop" misleads.
    drops_known = drops is not None and args.capacity == "none"
    comparisons = {}
    for phase in phases:
        if phase.name != baseline:
            comparisons[f"{phase.name}_vs_{baseline}"] = compare(
                phase.name, baseline, drops_known and phase.name == "optimized"
            )
    if "reference" in results:
        comparisons["optimized_vs_original"] = compare("optimized", "original", False)

    cmp = comparisons[f"optimized_vs_{baseline}"]
    from .common import PPL_RTOL

    ppl_ok = ppl_within_tolerance(cmp["perplexity_rel_diff"], setup.dtype)
    same = cmp["generation"]["all_identical"]
    verdict = {
        "against": baseline,
        "capacity": args.capacity,
        "perplexity_rel_tolerance": PPL_RTOL[setup.dtype],
        "perplexity_within_tolerance": ppl_ok,
        "generated_tokens_identical": same,
        "bleu_equal": cmp["bleu_diff"] == 0.0,
        "bleu_diff": cmp["bleu_diff"],
        "sentences": cmp["generation"]["sequences"],
        "sentences_differing": cmp["generation"]["sequences"] - cmp["generation"]["identical_sequences"],
        "unchanged": bool(ppl_ok and same),
    }
    if not same and setup.dtype != torch.float32 and args.float32_check:
        # In bfloat16 / float16 greedy decoding flips near-ties under rounding, and one flipped token
        # changes the rest of the sentence. The same two models in float32 tell rounding from a change.
        with float32_weights(model):
            for phase in iterate_phases(model, [p for p in phases if p.name in (baseline, "optimized")], *modes):
                results32[phase.name], generations32[phase.name], scores32[phase.name] = translate(
                    phase.name, " float32", None
                )
        verdict.update(float32_verdict(results32, generations32, scores32, generations, phase_reports, baseline))
    if "sequences_changed_without_any_drop" in cmp:
        verdict["changes_only_where_original_drops"] = cmp["sequences_changed_without_any_drop"] == 0
    task = {
        "objective": "translation: corpus BLEU and chrF (sacrebleu defaults), teacher-forced perplexity",
        "pairs": len(pairs),
        "decoding": "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams",
        "max_new_tokens": args.max_new_tokens or "min(400, 1.6 x padded source length + 10)",
        "max_source_length": args.max_source_length,
        "forced_bos_token_id": prep["forced_bos"],
        "decoder_start_token_id": prep["start"],
        "metrics": args.metrics,
    }
    return finish_report(
        setup,
        task_name="mt_bleu",
        task=task,
        phases=phase_reports,
        baseline=baseline,
        comparisons=comparisons,
        verdict=verdict,
        drops=drops,
        notes=notes,
    )
