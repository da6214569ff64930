"""Train the project's tiny causal mixture-of-experts checkpoint ``qwen3-moe-tiny-ddtp`` on the DDTP data.

A ``Qwen3MoeForCausalLM`` (8 experts, top-2 softmax router, SiLU-GLU experts, every layer sparse) trained
as a next-token language model on the English DDTP package descriptions ``en.train.txt.gz``, with the
router load-balancing loss (``output_router_logits=True``, ``router_aux_loss_coef``). A byte-level BPE
tokenizer is trained on the same text, so any input (newlines included) tokenizes without ``<unk>``.

Training stream: the training descriptions in a fresh random order every epoch, each one either plain
and followed by a blank line (``"\\n\\n"``, the document separator ``hf-moe-opt eval-lm`` uses for causal
models) or wrapped as ``<s> description </s>`` (what the tokenizer produces: it prepends ``<s>``; a
generation ends at ``</s>``), half and half; the stream is cut into windows of ``--seq-len`` tokens
starting at a random offset. Loss = next-token cross-entropy + ``router_aux_loss_coef`` * aux loss.

Evaluation on ``en.test.txt.gz``:

* strided-window perplexity with exactly ``hf-moe-opt eval-lm``'s causal recipe (descriptions joined by
  blank lines, no special tokens, window ``--eval-window`` moved by ``--eval-stride``), computed by
  :func:`hf_moe_opt.evaluation.lm.causal_perplexity`;
* per-description perplexity: each description scored alone as ``<s> description </s>`` (first
  ``--seq-len`` tokens; the ``</s>`` is scored only for descriptions that fit), tokens after ``<s>``;
* per-layer expert usage on that per-description pass (router top-1 and top-2 shares per expert).

    python eval/train_tiny_causal.py --out-dir hf_moe_opt/assets --minutes 9 --max-steps 1200 --seed 0

CPU only, one torch thread: runs with the same seed and step count are bit-reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO_ROOT))

from train_tiny_models import (  # noqa: E402
    file_sizes,
    read_lines,
    run_training,
    seed_everything,
    train_metrics,
    usage_summary,
    versions,
)

NAME = "qwen3-moe-tiny-ddtp"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SEPARATOR = "\n\n"


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) with ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2.

    The pre-tokenizer splits ``"\\n\\n"`` into two ``"\\n"`` pieces, so a description is tokenized the
    same alone and inside blank-line-joined text. The post-processor prepends ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


# ----------------------------------------------------------------------------- model
def qwen3_moe_config(vocab_size: int, ids: dict[str, int], args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,  # dense MLP size; unused (every layer is sparse)
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        use_cache=True,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )


# ----------------------------------------------------------------------------- training data
def epoch_windows(docs: list[np.ndarray], ids: dict[str, int], sep: np.ndarray, seq_len: int, rng: np.random.Generator):
    """One epoch's stream (documents shuffled, each plain + separator or ``<s> .. </s>``) cut into rows."""
    order = rng.permutation(len(docs))
    wrapped = rng.random(len(docs)) < 0.5
    bos, eos = np.array([ids[BOS]]), np.array([ids[EOS]])
    parts = []
    for i, w in zip(order, wrapped[order], strict=True):
        parts.extend((bos, docs[i], eos) if w else (docs[i], sep))
    stream = np.concatenate(parts)
    start = int(rng.integers(0, seq_len))
    rows = (len(stream) - start) // seq_len
    return torch.from_numpy(stream[start : start + rows * seq_len].reshape(rows, seq_len).astype(np.int64))


# ----------------------------------------------------------------------------- evaluation
def strided_test_perplexity(model, tokenizer, test_path: Path, window: int, stride: int):
    """``hf-moe-opt eval-lm``'s causal perplexity (same reader, join, tokenization and windows)."""
    from hf_moe_opt.evaluation.common import DataSpec, read_data
    from hf_moe_opt.evaluation.lm import causal_perplexity

    texts = read_data(DataSpec(path=test_path), pairs=False)
    ids = torch.tensor(tokenizer(SEPARATOR.join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    result = causal_perplexity(model, ids, window, stride, torch.device("cpu"), "strided test ppl")
    return result, len(texts), int(ids.numel())


def per_description_eval(model, tokenizer, texts: list[str], max_len: int, ids: dict[str, int], batch_rows: int = 32):
    """Per-description NLL of ``<s> text </s>`` (truncated to ``max_len`` tokens) and expert usage."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seqs = []
    for e in encoded:
        seq = [ids[BOS]] + e + [ids[EOS]]
        seqs.append(seq[:max_len])
    num_experts = model.config.num_experts
    top1: dict[str, np.ndarray] = {}
    routed: dict[str, np.ndarray] = {}
    current: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Qwen3MoeTopKRouter):
            key = name.removesuffix(".gate")
            top1[key] = np.zeros(num_experts)
            routed[key] = np.zeros(num_experts)

            def hook(mod, inputs, output, key=key):
                chosen = output[2][current["mask"]]
                top1[key] += np.bincount(chosen[:, 0].numpy(), minlength=num_experts)
                routed[key] += np.bincount(chosen.reshape(-1).numpy(), minlength=num_experts)

            hooks.append(module.register_forward_hook(hook))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    nll, n_tok = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_rows):
                chunk = [seqs[i] for i in order[start : start + batch_rows]]
                width = max(len(s) for s in chunk)
                input_ids = torch.full((len(chunk), width), ids[PAD], dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, s in enumerate(chunk):
                    input_ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                current["mask"] = mask.reshape(-1).bool()
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum"))
                n_tok += int((labels != -100).sum())
    finally:
        for h in hooks:
            h.remove()
    return nll, n_tok, len(seqs), top1, routed


def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    out = []
    with torch.no_grad():
        for prompt in prompts:
            batch = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            text = tokenizer.decode(gen[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out.append({"prompt": prompt, "greedy_continuation": text})
    return out


# ----------------------------------------------------------------------------- main
def train(args, out_dir: Path, budget_s: float) -> dict:
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    data = Path(args.data_dir)
    train_text = read_lines(data / "en.train.txt.gz")
    test_text = read_lines(data / "en.test.txt.gz")

    t_tok = time.perf_counter()
    tok = train_tokenizer(train_text, args.vocab)
    hf_tok = wrap_tokenizer(tok)
    ids = {t: tok.token_to_id(t) for t in (PAD, BOS, EOS)}
    print(f"[{NAME}] tokenizer trained in {time.perf_counter() - t_tok:.1f} s, vocab {tok.get_vocab_size()}")
    docs = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(train_text, add_special_tokens=False)]
    docs = [d for d in docs if len(d)]
    # The separator's tokens between two descriptions (as in the joined evaluation text).
    sep = np.asarray(tok.encode("x" + SEPARATOR + "y", add_special_tokens=False).ids[1:-1], dtype=np.int32)
    train_tokens = int(sum(len(d) for d in docs))

    seed_everything(args.seed)
    config = qwen3_moe_config(tok.get_vocab_size(), ids, args)
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{NAME}] params {n_params / 1e6:.2f}M, train descriptions {len(docs)}, train tokens {train_tokens}")

    np_rng = np.random.default_rng(args.seed)
    py_rng = random.Random(args.seed)
    state: dict[str, torch.Tensor] = {}

    def batches_fn(epoch):
        state["rows"] = epoch_windows(docs, ids, sep, args.seq_len, np_rng)
        idx = list(range(state["rows"].shape[0]))
        py_rng.shuffle(idx)
        return [idx[i : i + args.batch_rows] for i in range(0, len(idx) - args.batch_rows + 1, args.batch_rows)]

    def make_batch(batch_idx):
        input_ids = state["rows"][batch_idx]
        out = model(input_ids=input_ids, output_router_logits=True)
        logits = out.logits[:, :-1].flatten(0, 1).float()
        loss = F.cross_entropy(logits, input_ids[:, 1:].flatten())
        return loss, config.router_aux_loss_coef * out.aux_loss

    trained = run_training(model, make_batch, batches_fn, args, args.lr, args.warmup, budget_s, NAME)
    model.eval()

    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False, num_beams=1
    )

    t_eval = time.perf_counter()
    strided, n_texts, n_stream = strided_test_perplexity(
        model, hf_tok, data / "en.test.txt.gz", args.eval_window, args.eval_stride
    )
    nll, n_tok, n_seqs, top1, routed = per_description_eval(model, hf_tok, test_text, args.seq_len, ids)
    per_desc_ppl = math.exp(nll / n_tok)
    samples = greedy_samples(
        model, hf_tok, ["This package provides", "A library for", "Python bindings for the"], args.sample_tokens
    )
    eval_seconds = time.perf_counter() - t_eval
    print(
        f"[{NAME}] steps {trained['steps']}, {trained['seconds'] / 60:.1f} min; test strided ppl "
        f"{strided.perplexity:.3f}, per-description ppl {per_desc_ppl:.3f} ({eval_seconds:.0f} s eval)"
    )
    for s in samples:
        print(f"[{NAME}] {s['prompt']!r} -> {s['greedy_continuation']!r}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    metrics = {
        "model": NAME,
        "architecture": "Qwen3MoeForCausalLM",
        "task": "next-token language modelling of English DDTP package descriptions",
        "test_split": "en.test.txt.gz",
        "test_strided": {
            "definition": (
                "hf-moe-opt eval-lm's causal recipe: the descriptions joined by blank lines, tokenized without "
                "special tokens, window moved by stride, every token from the second on scored once"
            ),
            "descriptions": n_texts,
            "tokens": n_stream,
            "tokens_scored": strided.tokens_scored,
            "window": args.eval_window,
            "stride": args.eval_stride,
            "perplexity": round(strided.perplexity, 3),
        },
        "test_per_description": {
            "definition": (
                f"each description alone as <s> text </s>, cut to {args.seq_len} tokens (</s> scored only when "
                "the description fits), every token after <s> scored"
            ),
            "descriptions": n_seqs,
            "tokens_scored": n_tok,
            "perplexity": round(per_desc_ppl, 3),
        },
        "greedy_samples": samples,
        "eval_seconds": round(eval_seconds, 1),
        "vocab_size": config.vocab_size,
        "parameters": n_params,
        "train_descriptions": len(docs),
        "train_tokens_per_epoch": train_tokens + len(docs) * 2,
        "train_tokens_seen": trained["steps"] * args.batch_rows * args.seq_len,
        **train_metrics(args, trained, args.lr, "train_final_loss"),
        "seq_len": args.seq_len,
        "batch_rows": args.batch_rows,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "expert_usage_test": {
            "definition": (
                "per-description test pass (padding excluded): 'top1' = fraction of tokens whose first router "
                "choice is each expert; 'routed' = fraction of the (token, expert) top-2 slots each expert gets"
            ),
            "top1": usage_summary(top1),
            "routed": usage_summary(routed),
        },
        "versions": versions(),
    }
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO_ROOT / "hf_moe_opt" / "assets"), help="writes OUT_DIR/" + NAME)
    p.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "ddtp"))
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=0, help="also stop (and schedule the LR) by steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--vocab", type=int, default=6000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=128, help="each expert's SiLU-GLU width")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    p.add_argument("--eval-window", type=int, default=112, help="strided test window (eval-lm's --max-length)")
    p.add_argument("--eval-stride", type=int, default=56, help="strided test stride (eval-lm's default)")
    p.add_argument("--sample-tokens", type=int, default=24, help="new tokens of the greedy samples in metrics.json")
    args = p.parse_args(argv)
    # run_training's settings: CPU, fp32, no validation.
    args.device = torch.device("cpu")
    args.no_bf16 = True
    args.valid_every = 0
    args.max_tokens = args.batch_rows * args.seq_len
    args.max_rows = args.batch_rows

    torch.set_num_threads(args.threads)
    # run_training reads the (graph-attached) aux loss for its progress bar; that read is harmless.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_everything(args.seed)
    out_dir = Path(args.out_dir) / NAME
    command = "python eval/train_tiny_causal.py " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics = train(args, out_dir, args.minutes * 60.0)
    metrics["command"] = command
    metrics["files_bytes"] = file_sizes(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"[{NAME}] saved to {out_dir}")


if __name__ == "__main__":
    main()
