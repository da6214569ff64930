"""The demo: original vs optimized on small MoE models, one side-by-side table.

Runs offline: the models are built from configs with seeded random weights, so nothing is
downloaded. For each family it reports the largest logit difference against the correct reference,
whether greedy generation yields identical tokens, and encoder throughput before and after.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from transformers import (
    NllbMoeConfig,
    NllbMoeForConditionalGeneration,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from .api import optimize
from .baselines import use_nllb_eager_reference
from .timing import median_ms


@dataclass
class DemoRow:
    model: str
    num_experts: int
    tokens: int
    max_abs_logit_diff: float
    same_generated_tokens: bool
    reference_ms: float
    optimized_ms: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.optimized_ms


def demo_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Two small MoE models, one per supported family, built from configs."""
    torch.manual_seed(seed)
    switch = SwitchTransformersForConditionalGeneration(
        SwitchTransformersConfig(
            vocab_size=512,
            d_model=128,
            d_ff=512,
            d_kv=32,
            num_heads=4,
            num_layers=4,
            num_decoder_layers=4,
            num_experts=32,
            expert_capacity=64,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    nllb = NllbMoeForConditionalGeneration(
        NllbMoeConfig(
            vocab_size=512,
            d_model=128,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            num_experts=32,
            decoder_start_token_id=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            max_position_embeddings=256,
        )
    ).eval()
    for model in (switch, nllb):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "router.classifier" in name:
                    p.normal_(0.0, 0.5)  # decisive, varied routing instead of near-uniform init
    return {"switch-transformers (32 experts)": switch, "nllb-moe (32 experts, top-2)": nllb}


def run_demo(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 16,
    seq_len: int = 64,
    backend: str = "auto",
) -> list[DemoRow]:
    dev = torch.device(device)
    rows = []
    for name, model in demo_models().items():
        model = model.to(dev, dtype)
        reference = copy.deepcopy(model)
        if "nllb" in name:
            use_nllb_eager_reference(reference)  # transformers 5.x's own NLLB-MoE block is wrong
        optimized = optimize(model, backend=backend)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=gen).to(dev)
        dec = ids[:, : seq_len // 4]
        with torch.no_grad():
            want = reference(input_ids=ids, decoder_input_ids=dec).logits.float()
            got = optimized(input_ids=ids, decoder_input_ids=dec).logits.float()
            kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
            same = torch.equal(reference.generate(ids[:4], **kw), optimized.generate(ids[:4], **kw))
            ref_ms = median_ms(lambda m=reference, i=ids: m.get_encoder()(input_ids=i), dev)
            opt_ms = median_ms(lambda m=optimized, i=ids: m.get_encoder()(input_ids=i), dev)
        rows.append(
            DemoRow(
                name, model.config.num_experts, batch * seq_len, float((got - want).abs().max()), same, ref_ms, opt_ms
            )
        )
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    head = (
        f"{'model':<34} {'tokens':>6} {'max |dlogit|':>12} {'same tokens':>11} "
        f"{'ref ms':>8} {'opt ms':>8} {'speed-up':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<34} {r.tokens:>6} {r.max_abs_logit_diff:>12.2e} {str(r.same_generated_tokens):>11} "
            f"{r.reference_ms:>8.1f} {r.optimized_ms:>8.1f} {r.speedup:>7.2f}x"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[DemoRow]) -> list[dict]:
    return [dict(asdict(r), speedup=r.speedup) for r in rows]
