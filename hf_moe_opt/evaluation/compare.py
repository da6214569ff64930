"""Running one model as original / reference / optimized, and comparing the runs.

One copy of the model is held: the phases swap modules in place (``use_*_eager_reference`` then
``remove_*_eager_reference``; ``optimize`` then ``restore``), so a large model is never duplicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..api import optimize, restore
from ..baselines import (
    remove_nllb_eager_reference,
    remove_switch_eager_reference,
    use_nllb_eager_reference,
    use_switch_eager_reference,
)
from .common import (
    PPL_RTOL,
    DropCounter,
    PeakMemory,
    Stopwatch,
    pad,
    transformers_nllb_block_is_correct,
    transformers_switch_applies_capacity,
    weight_bytes,
)

# Per-token NLL change that counts a target token as "changed" (absolute, nats), by dtype.
TOKEN_ATOL = {torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}

HF_NLLB_NOTE = (
    "transformers {version}'s own NLLB-MoE block is wrong (NllbMoeExperts.forward one-hots the already "
    "one-hot top-1 mask, so only expert_0 and expert_1 ever run; checked numerically at start-up). The "
    "'original' column is that installed forward; 'reference' is the correct eager block "
    "(hf_moe_opt.baselines.use_nllb_eager_reference). 'Unchanged' is judged against the reference."
)

HF_SWITCH_NOTE = (
    "transformers {version}'s own Switch Transformers block never applies expert capacity (5.0-5.17: the "
    "router's cumsum runs over a size-1 dimension; checked numerically at start-up), so the 'original' "
    "column drops no token. 'reference' is the block with capacity counted per sequence, as in "
    "transformers 4.57 and >= 5.23 (hf_moe_opt.baselines.use_switch_eager_reference; docs/semantics.md). "
    "'Unchanged' is judged against the reference."
)


@dataclass
class Phase:
    name: str
    description: str


def has_nllb(model: nn.Module) -> bool:
    return any(type(m).__name__ == "NllbMoeSparseMLP" for m in model.modules())


def has_switch(model: nn.Module) -> bool:
    return any(type(m).__name__ == "SwitchTransformersSparseMLP" for m in model.modules())


def plan_phases(model: nn.Module) -> tuple[list[Phase], str, list[str]]:
    """``(phases, baseline phase name, notes)`` for ``model``."""
    import transformers

    phases = [Phase("original", "the model as transformers runs it")]
    notes: list[str] = []
    if has_nllb(model) and not transformers_nllb_block_is_correct():
        phases.append(Phase("reference", "correct eager NLLB-MoE block (hf_moe_opt.baselines)"))
        notes.append(HF_NLLB_NOTE.format(version=transformers.__version__))
    if has_switch(model) and not transformers_switch_applies_capacity():
        phases.append(Phase("reference", "Switch block with capacity per sequence (hf_moe_opt.baselines)"))
        notes.append(HF_SWITCH_NOTE.format(version=transformers.__version__))
    phases.append(Phase("optimized", "hf_moe_opt.optimize"))
    return phases, phases[-2].name, notes


def enter_phase(model: nn.Module, phase: Phase, capacity: str, backend: str) -> None:
    if phase.name == "reference":  # a model has NLLB-MoE or Switch blocks, never both
        use_nllb_eager_reference(model)
        use_switch_eager_reference(model)
    elif phase.name == "optimized":
        optimize(model, capacity=capacity, backend=backend)


def leave_phase(model: nn.Module, phase: Phase) -> None:
    if phase.name == "reference":
        remove_nllb_eager_reference(model)
        remove_switch_eager_reference(model)
    elif phase.name == "optimized":
        restore(model)


def iterate_phases(model: nn.Module, phases: Sequence[Phase], capacity: str, backend: str) -> Iterator[Phase]:
    """Yield each phase with the model set up for it; undo the swap afterwards (also on errors)."""
    for phase in phases:
        enter_phase(model, phase, capacity, backend)
        try:
            yield phase
        finally:
            leave_phase(model, phase)


@contextmanager
def float32_weights(model: nn.Module) -> Iterator[None]:
    """Floating-point parameters and buffers in float32 inside the block, back to their dtypes after.

    In place (the same Parameter objects), so ``optimize`` / ``restore`` and the eager references work
    as usual; casting a bfloat16 / float16 value to float32 and back is exact.
    """
    saved = [(t, t.dtype) for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    for t, _ in saved:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in saved:
            t.data = t.data.to(dtype)


@dataclass
class TeacherForcedBatch:
    """One teacher-forced batch: encoder inputs and the target tokens to score."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 = not scored
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None


@dataclass
class TeacherForcedResult:
    """Per-sequence target-token NLLs and argmax predictions, totals, time and memory."""

    token_nll: dict[int, torch.Tensor] = field(default_factory=dict)
    argmax: dict[int, torch.Tensor] = field(default_factory=dict)
    dropped_rows: dict[int, bool] = field(default_factory=dict)
    tokens_scored: int = 0
    tokens_processed: int = 0
    seconds: float = 0.0
    peak_bytes: int | None = None
    memory_method: str = ""

    @property
    def nll_sum(self) -> float:
        return float(sum(float(v.double().sum()) for v in self.token_nll.values()))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens_scored, 1))


def teacher_forced(
    model: nn.Module,
    batches: Sequence[TeacherForcedBatch],
    device: torch.device,
    desc: str,
    drops: DropCounter | None = None,
    progress: bool = True,
) -> TeacherForcedResult:
    """Score every batch (first one also as an untimed warm-up); logits are taken in float32."""
    result = TeacherForcedResult()
    clock = Stopwatch(device)
    meter = PeakMemory(device)
    with torch.no_grad(), meter:
        if batches:
            _forward(model, batches[0], device)  # warm-up, not timed, not counted
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
            if drops is not None:
                drops.set_masks(batch.attention_mask.bool(), batch.labels != -100)
                drops.reset_rows()
            with clock.time():
                if drops is not None:
                    with drops.counting():
                        logits = _forward(model, batch, device)
                else:
                    logits = _forward(model, batch, device)
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
            labels = batch.labels
            scored = labels != -100
            nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            pred = logp.argmax(dim=-1)
            for row, idx in enumerate(batch.indices):
                keep = scored[row]
                result.token_nll[idx] = nll[row][keep].double()
                result.argmax[idx] = pred[row][keep]
                if drops is not None:
                    result.dropped_rows[idx] = bool(drops.rows_with_drops(row))
            result.tokens_scored += int(scored.sum())
            dec_tokens = batch.decoder_attention_mask if batch.decoder_attention_mask is not None else scored
            result.tokens_processed += int(batch.attention_mask.sum()) + int(dec_tokens.sum())
    result.seconds = clock.seconds
    result.peak_bytes = meter.peak_bytes
    result.memory_method = meter.method
    return result


def _forward(model: nn.Module, batch: TeacherForcedBatch, device: torch.device) -> torch.Tensor:
    kwargs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
    }
    if batch.decoder_input_ids is not None:
        kwargs["decoder_input_ids"] = batch.decoder_input_ids.to(device)
        if batch.decoder_attention_mask is not None:
            kwargs["decoder_attention_mask"] = batch.decoder_attention_mask.to(device)
    else:
        kwargs["labels"] = batch.labels.to(device)
    return model(**kwargs).logits


def compare_teacher_forced(
    got: TeacherForcedResult, want: TeacherForcedResult, dtype: torch.dtype, drops_known: bool
) -> dict:
    """Perplexity difference, per-token NLL differences and where they occur."""
    atol = TOKEN_ATOL[dtype]
    max_diff = 0.0
    same_argmax = total = 0
    changed_seqs = changed_without_drop = 0
    for idx, want_nll in want.token_nll.items():
        diff = (got.token_nll[idx] - want_nll).abs()
        if diff.numel():
            d = float(diff.max())
            max_diff = max(max_diff, d)
            if d > atol:
                changed_seqs += 1
                if drops_known and not want.dropped_rows.get(idx, False):
                    changed_without_drop += 1
        same_argmax += int((got.argmax[idx] == want.argmax[idx]).sum())
        total += int(want_nll.numel())
    ppl_g, ppl_w = got.perplexity, want.perplexity
    out = {
        "perplexity_diff": ppl_g - ppl_w,
        "perplexity_rel_diff": (ppl_g - ppl_w) / ppl_w,
        "max_abs_token_nll_diff": max_diff,
        "argmax_agreement": same_argmax / max(total, 1),
        "token_nll_atol": atol,
        "sequences": len(want.token_nll),
        "sequences_changed": changed_seqs,
    }
    if drops_known:
        out["sequences_with_dropped_tokens"] = sum(want.dropped_rows.values())
        out["sequences_changed_without_any_drop"] = changed_without_drop
    return out


def ppl_within_tolerance(rel_diff: float, dtype: torch.dtype) -> bool:
    return abs(rel_diff) <= PPL_RTOL[dtype]


def run_timed(fn: Callable[[], object], clock: Stopwatch) -> object:
    with clock.time():
        return fn()


def generate_batches(
    model: nn.Module,
    sources: Sequence[Sequence[int]],
    batches: Sequence[list[int]],
    pad_id: int,
    device: torch.device,
    gen_kwargs: Callable[[torch.Tensor], dict],
    desc: str,
    progress: bool = True,
) -> tuple[dict[int, list[int]], float, int, int | None, str]:
    """Generate for every batch; returns ``(tokens per index, seconds, generated tokens, peak bytes,
    memory method)``. Generated tokens exclude the decoder start token and padding after EOS."""
    outputs: dict[int, list[int]] = {}
    clock = Stopwatch(device)
    meter = PeakMemory(device)
    new_tokens = 0
    with torch.no_grad(), meter:
        for chunk in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
            input_ids = pad([sources[i] for i in chunk], pad_id).to(device)
            mask = (input_ids != pad_id).long()
            with clock.time():
                gen = model.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs(input_ids))
            for i, row in zip(chunk, gen.tolist(), strict=True):
                row = row[1:]  # decoder start token
                while row and row[-1] == pad_id:
                    row.pop()
                outputs[i] = row
                new_tokens += len(row)
    return outputs, clock.seconds, new_tokens, meter.peak_bytes, meter.method


def compare_generations(got: dict[int, list[int]], want: dict[int, list[int]]) -> dict:
    differing = [i for i in want if got.get(i) != want[i]]
    return {
        "sequences": len(want),
        "identical_sequences": len(want) - len(differing),
        "all_identical": not differing,
        "first_differing_indices": differing[:10],
    }


def model_memory(model: nn.Module) -> int:
    return weight_bytes(model)
