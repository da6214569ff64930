"""Train the project's two tiny mixture-of-experts checkpoints on the DDTP data.

* ``switch-tiny-ddtp``: ``SwitchTransformersForConditionalGeneration`` trained with T5-style span
  corruption on ``en.train.txt.gz``; span-corruption perplexity on ``en.test.txt.gz``.
* ``nllb-moe-tiny-ddtp``: ``NllbMoeForConditionalGeneration`` trained English -> German on
  ``en-de.train.tsv.gz``; BLEU / chrF (sacrebleu) on ``en-de.test.tsv.gz``.

Both get their own byte-level-free BPE tokenizer trained on the training text, are saved with
``save_pretrained`` (safetensors) and load with plain transformers. NLLB-MoE is trained and evaluated
with the correct top-2 sparse MLP of ``_tiny_nllb_training`` (transformers 5.x's own one is wrong).

    python eval/train_tiny_models.py --which both --out-dir hf_moe_opt/assets --minutes 10 --seed 0

Files read from ``--data-dir``: ``en.train.txt.gz`` and ``en.test.txt.gz`` (Switch),
``en-de.train.tsv.gz`` and ``en-de.test.tsv.gz`` (NLLB-MoE), and, only with ``--valid-every N``,
``en.valid.txt.gz`` / ``en-de.valid.tsv.gz``.

``--device cuda`` trains with bf16 autocast (fp32 master weights and fp32 routers; checkpoints are
saved in fp32) and evaluates in fp32 on the GPU. GPU runs are seeded but not bit-reproducible
(atomic adds in the backward pass); CPU runs with one thread are.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SWITCH_NAME = "switch-tiny-ddtp"
NLLB_NAME = "nllb-moe-tiny-ddtp"
NUM_SENTINELS = 100
SRC_LANG = "eng_Latn"
TGT_LANG = "deu_Latn"


# ----------------------------------------------------------------------------- data and tokenizers
def read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in read_lines(path):
        src, _, tgt = line.partition("\t")
        if src.strip() and tgt.strip():
            pairs.append((src.strip(), tgt.strip()))
    return pairs


def train_tokenizer(texts, vocab_size: int, specials: list[str], extra_specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra_specials),
        special_tokens=specials,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(extra_specials)
    return tok


def wrap_tokenizer(tok, template: str, **special_tokens):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    names = sorted({t for t in template.split() if not t.startswith("$")})
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in names]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def encode(tok, texts: list[str], max_len: int) -> list[list[int]]:
    return [e.ids[:max_len] for e in tok.encode_batch(texts, add_special_tokens=False)]


def length_batches(lengths: list[int], max_tokens: int, max_rows: int, rng: random.Random, shuffle: bool):
    """Batches of indices of similar length (pools of up to 50 * max_rows sorted by length), padded size capped.

    The pool is at most a quarter of the data (but at least 3200 rows), so large batches still differ
    from epoch to epoch.
    """
    idx = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(idx)
    pool = min(max_rows * 50, max(3200, len(idx) // 4))
    batches = []
    for start in range(0, len(idx), pool):
        chunk = sorted(idx[start : start + pool], key=lambda i: lengths[i])
        cur: list[int] = []
        longest = 0
        for i in chunk:
            new_longest = max(longest, lengths[i])
            if cur and (new_longest * (len(cur) + 1) > max_tokens or len(cur) >= max_rows):
                batches.append(cur)
                cur, new_longest = [], lengths[i]
            cur.append(i)
            longest = new_longest
        if cur:
            batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


def pad_to(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- device helpers
def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def autocast_ctx(args):
    """bf16 autocast for the training forward on CUDA (unless --no-bf16); a no-op on CPU."""
    enabled = args.device.type == "cuda" and not args.no_bf16
    return torch.autocast(device_type=args.device.type, dtype=torch.bfloat16, enabled=enabled)


def _fp32_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def keep_routers_fp32(model, router_cls) -> int:
    """Router classifiers run in float32 even under autocast (instance-level forward, weights untouched)."""
    n = 0
    for module in model.modules():
        if isinstance(module, router_cls):
            module.classifier.forward = types.MethodType(_fp32_linear_forward, module.classifier)
            n += 1
    return n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training loop
def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay over the run's progress (fraction of the step/time budget)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_training(
    model, make_batch, batches_fn, args, peak_lr: float, warmup: int, budget_s: float, desc: str, valid_fn=None
):
    """Train until the time budget (or ``--max-steps``) is spent.

    ``make_batch`` runs the forward (under ``autocast_ctx``) and returns (loss, aux) on the model's device;
    losses stay on the device and are read back every 20 steps, so a GPU is not synchronised every step.
    With ``valid_fn`` and ``--valid-every N`` the validation loss is computed every N steps and at the
    end, and the weights with the lowest one are restored. Returns a dict with steps, seconds, epochs,
    the mean of the last 100 training losses and the validation history.
    """
    kw = {"fused": True} if args.device.type == "cuda" else {}
    optim = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, **kw)
    model.train()
    step, epoch, t0 = 0, 0, time.perf_counter()
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    valid_every = args.valid_every if valid_fn is not None else 0
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None

    def validate():
        nonlocal best
        value = valid_fn()
        history.append({"step": step, "valid_loss": round(value, 4)})
        if best is None or value < best[0]:
            best = (value, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        model.train()
        return value

    bar = tqdm(total=int(budget_s), desc=desc, unit="s", dynamic_ncols=True, mininterval=5)
    last_tick = 0
    done = False
    while not done:
        for batch_idx in batches_fn(epoch):
            elapsed = time.perf_counter() - t0
            progress = elapsed / budget_s
            if args.max_steps:
                progress = max(progress, step / args.max_steps)
            if progress >= 1.0:
                done = True
                break
            for group in optim.param_groups:
                group["lr"] = lr_at(step, progress, peak_lr, warmup)
            with autocast_ctx(args):
                loss, aux = make_batch(batch_idx)
            optim.zero_grad(set_to_none=True)
            (loss.float() + aux.float()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            step += 1
            pending.append(loss.detach().float())
            now = int(time.perf_counter() - t0)
            if now > last_tick:
                bar.update(min(now, int(budget_s)) - last_tick)
                last_tick = min(now, int(budget_s))
            if step % 20 == 0:
                losses.extend(torch.stack(pending).cpu().tolist())
                pending.clear()
                recent = np.mean(losses[-20:])
                bar.set_postfix(step=step, epoch=epoch, loss=f"{recent:.3f}", aux=f"{float(aux):.4f}")
            if valid_every and step % valid_every == 0:
                bar.write(f"[{desc}] step {step}: valid loss {validate():.4f}")
        epoch += 1
    if pending:
        losses.extend(torch.stack(pending).cpu().tolist())
    sync(args.device)
    seconds = time.perf_counter() - t0
    bar.close()
    result = {
        "steps": step,
        "seconds": seconds,
        "epochs": epoch,
        "last_loss": float(np.mean(losses[-100:])) if losses else float("nan"),
    }
    if valid_every:
        if not history or history[-1]["step"] != step:
            print(f"[{desc}] step {step}: valid loss {validate():.4f}")
        model.load_state_dict(best[2])
        result.update(valid_history=history, best_step=best[1], best_valid_loss=round(best[0], 4))
        print(f"[{desc}] restored the weights of step {best[1]} (valid loss {best[0]:.4f})")
    model.eval()
    return result


def usage_summary(counts: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, c in counts.items():
        frac = c / max(c.sum(), 1)
        nz = frac[frac > 0]
        out[name] = {
            "fraction_per_expert": [round(float(x), 4) for x in frac],
            "max_fraction": round(float(frac.max()), 4),
            "normalized_entropy": round(float(-(nz * np.log(nz)).sum() / math.log(len(frac))), 4),
        }
    return out


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train_metrics(args, trained: dict, peak_lr: float, loss_key: str) -> dict:
    out = {
        "train_steps": trained["steps"],
        "train_epochs_started": trained["epochs"],
        "train_seconds": round(trained["seconds"], 1),
        loss_key: round(trained["last_loss"], 4),
        "seed": args.seed,
        "max_tokens_per_batch": args.max_tokens,
        "max_rows_per_batch": args.max_rows,
        "peak_lr": peak_lr,
        "warmup_steps": args.warmup,
        "device": str(args.device),
        "bf16_autocast": args.device.type == "cuda" and not args.no_bf16,
        "torch_threads": torch.get_num_threads(),
    }
    if "valid_history" in trained:
        out["valid_every_steps"] = args.valid_every
        out["best_step"] = trained["best_step"]
        out["best_valid_loss"] = trained["best_valid_loss"]
        out["valid_history"] = trained["valid_history"]
    return out


def versions(device: torch.device | None = None) -> dict[str, str]:
    import tokenizers
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__}
    v["transformers"] = transformers.__version__
    v["tokenizers"] = tokenizers.__version__
    if device is not None and device.type == "cuda":
        v["cuda"] = str(torch.version.cuda)
        v["gpu"] = torch.cuda.get_device_name(device)
    try:
        import sacrebleu

        v["sacrebleu"] = sacrebleu.__version__
    except ImportError:
        pass
    return v


# ----------------------------------------------------------------------------- Switch Transformers
def noise_span_mask(length: int, rng: np.random.Generator, density: float = 0.15, mean_span: float = 3.0):
    """T5's random span mask: noise and non-noise spans alternate, starting with non-noise."""
    num_noise = min(max(int(round(length * density)), 1), length - 1)
    num_spans = min(max(int(round(num_noise / mean_span)), 1), NUM_SENTINELS)
    num_spans = min(num_spans, num_noise, length - num_noise)

    def segment(n: int, k: int) -> np.ndarray:
        first = np.zeros(n, dtype=bool)
        first[1:][rng.permutation(n - 1)[: k - 1]] = True
        return np.bincount(np.cumsum(first), minlength=k)

    noise_lens = segment(num_noise, num_spans)
    keep_lens = segment(length - num_noise, num_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_lens, noise_lens, strict=True):
        pos += keep
        mask[pos : pos + noise] = True
        pos += noise
    return mask


def span_corrupt(ids: list[int], rng: np.random.Generator, sentinels: list[int], eos: int):
    mask = noise_span_mask(len(ids), rng)
    inputs, labels = [], []
    span = -1
    for i, (tid, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                span += 1
                inputs.append(sentinels[span])
                labels.append(sentinels[span])
            labels.append(tid)
        else:
            inputs.append(tid)
    return inputs + [eos], labels + [eos]


def switch_config(vocab_size: int, pad_id: int, eos_id: int, dropout: float = 0.05):
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_heads=4,
        num_layers=4,
        num_sparse_encoder_layers=2,
        num_decoder_layers=2,
        num_sparse_decoder_layers=1,
        num_experts=8,
        expert_capacity=64,
        router_jitter_noise=0.01,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=dropout,
        dense_act_fn="relu",
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        tie_word_embeddings=True,
    )


def train_switch(args, out_dir: Path, budget_s: float) -> dict:
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.models.switch_transformers import modeling_switch_transformers as ms

    data = Path(args.data_dir)
    train_text = read_lines(data / "en.train.txt.gz")
    test_text = read_lines(data / "en.test.txt.gz")
    if args.eval_limit:
        test_text = test_text[: args.eval_limit]
    sentinel_tokens = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
    tok = train_tokenizer(train_text, args.switch_vocab, ["<pad>", "</s>", "<unk>"], sentinel_tokens)
    hf_tok = wrap_tokenizer(
        tok,
        "$A </s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=sentinel_tokens,
    )
    pad_id, eos_id = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    sentinels = [tok.token_to_id(t) for t in sentinel_tokens]
    max_len = args.switch_max_len
    train_ids = [s for s in encode(tok, train_text, max_len) if len(s) >= 4]
    test_ids = [s for s in encode(tok, test_text, max_len) if len(s) >= 4]

    device = args.device
    seed_everything(args.seed)
    config = switch_config(tok.get_vocab_size(), pad_id, eos_id, args.switch_dropout)
    model = SwitchTransformersForConditionalGeneration(config).to(device)
    keep_routers_fp32(model, ms.SwitchTransformersTop1Router)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[switch] vocab {config.vocab_size}, params {n_params / 1e6:.2f}M, train seqs {len(train_ids)}")

    np_rng = np.random.default_rng(args.seed)
    py_rng = random.Random(args.seed)
    lengths = [len(s) for s in train_ids]

    def batches_fn(epoch):
        return length_batches(lengths, args.max_tokens, args.max_rows, py_rng, shuffle=True)

    def make_batch(batch_idx):
        pairs = [span_corrupt(train_ids[i], np_rng, sentinels, eos_id) for i in batch_idx]
        input_ids = pad_to([p[0] for p in pairs], pad_id, device)
        labels = pad_to([p[1] for p in pairs], -100, device)
        out = model(
            input_ids=input_ids,
            attention_mask=(input_ids != pad_id).long(),
            labels=labels,
            output_router_logits=True,
        )
        aux = config.router_aux_loss_coef * (out.encoder_aux_loss + out.decoder_aux_loss)
        aux = aux + config.router_z_loss_coef * (out.encoder_z_loss + out.decoder_z_loss)
        logits = out.logits.flatten(0, 1).float()
        return F.cross_entropy(logits, labels.flatten(), ignore_index=-100), aux

    def span_nll(pairs, batch_tokens: int, batch_rows: int, masks: dict | None = None):
        """Summed NLL and target-token count of span-corruption pairs (eval mode, fp32, no grad)."""
        model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=device)
        n_tok = 0
        with torch.no_grad():
            for batch_idx in length_batches([len(q[0]) for q in pairs], batch_tokens, batch_rows, py_rng, False):
                input_ids = pad_to([pairs[i][0] for i in batch_idx], pad_id, device)
                labels = pad_to([pairs[i][1] for i in batch_idx], -100, device)
                if masks is not None:
                    masks["encoder"] = input_ids != pad_id
                    masks["decoder"] = labels != -100
                attention_mask = (input_ids != pad_id).long()
                out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
                logits = out.logits.flatten(0, 1).float()
                nll += F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum").double()
                n_tok += sum(len(pairs[i][1]) for i in batch_idx)
        return float(nll), n_tok

    valid_fn = None
    if args.valid_every:
        valid_text = read_lines(data / "en.valid.txt.gz")
        valid_rng = np.random.default_rng(4321)
        valid_pairs = [
            span_corrupt(s, valid_rng, sentinels, eos_id) for s in encode(tok, valid_text, max_len) if len(s) >= 4
        ]

        def valid_fn():
            nll, n = span_nll(valid_pairs, max(8192, args.max_tokens), max(128, args.max_rows))
            return nll / n

    trained = run_training(
        model, make_batch, batches_fn, args, args.switch_lr, args.warmup, budget_s, "switch", valid_fn
    )
    steps, seconds = trained["steps"], trained["seconds"]

    # Evaluation: span-corruption perplexity on the test split (fixed corruption seed), expert usage.
    counts: dict[str, np.ndarray] = {}
    current_mask: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, ms.SwitchTransformersTop1Router):
            key = name.removesuffix(".mlp.router")
            counts[key] = np.zeros(config.num_experts)

            def hook(mod, inputs, output, key=key):
                side = "encoder" if key.startswith("encoder") else "decoder"
                real = current_mask[side].reshape(-1)
                top1 = output[2].argmax(dim=-1).reshape(-1)[real]
                counts[key] += np.bincount(top1.cpu().numpy(), minlength=config.num_experts)

            hooks.append(module.register_forward_hook(hook))
    eval_rng = np.random.default_rng(1234)
    test_pairs = [span_corrupt(s, eval_rng, sentinels, eos_id) for s in test_ids]
    nll, n_tok = span_nll(test_pairs, 8192, 128, current_mask)
    for h in hooks:
        h.remove()
    ppl = math.exp(nll / n_tok)
    print(f"[switch] steps {steps}, {seconds / 60:.1f} min, test span-corruption ppl {ppl:.2f}")

    model.to("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    metrics = {
        "model": SWITCH_NAME,
        "architecture": "SwitchTransformersForConditionalGeneration",
        "task": "T5 span corruption (noise density 0.15, mean span 3), English DDTP descriptions",
        "test_split": "en.test.txt.gz",
        "test_sequences": len(test_pairs),
        "test_target_tokens": n_tok,
        "test_span_corruption_perplexity": round(ppl, 3),
        "test_corruption_seed": 1234,
        "vocab_size": config.vocab_size,
        "parameters": n_params,
        **train_metrics(args, trained, args.switch_lr, "train_final_loss"),
        "dropout": args.switch_dropout,
        "expert_usage_test": {
            "definition": "fraction of non-padding test tokens whose top-1 (router argmax) is each expert",
            "layers": usage_summary(counts),
        },
        "versions": versions(args.device),
    }
    return metrics


# ----------------------------------------------------------------------------- NLLB-MoE
def nllb_config(vocab_size: int, ids: dict[str, int], expert_capacity: int, args=None):
    from transformers import NllbMoeConfig

    d_model = getattr(args, "nllb_d_model", 128)
    ffn = getattr(args, "nllb_ffn_dim", 256)
    return NllbMoeConfig(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        d_model=d_model,
        encoder_layers=getattr(args, "nllb_encoder_layers", 4),
        decoder_layers=getattr(args, "nllb_decoder_layers", 2),
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        dropout=getattr(args, "nllb_dropout", 0.1),
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        num_experts=8,
        expert_capacity=expert_capacity,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        second_expert_policy="all",
        normalize_router_prob_before_dropping=False,
        batch_prioritized_routing=False,
        moe_eval_capacity_token_fraction=1.0,
        moe_token_dropout=0.1,
        scale_embedding=True,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        decoder_start_token_id=ids["</s>"],
        tie_word_embeddings=True,
    )


def translate(model, src_ids: list[list[int]], pad_id: int, gen_kwargs: dict, batch_rows: int = 48):
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    outputs: list[list[int]] = [[] for _ in src_ids]
    device = next(model.parameters()).device
    with torch.no_grad():
        starts = range(0, len(order), batch_rows)
        for start in tqdm(starts, desc="translate", dynamic_ncols=True, mininterval=5):
            chunk = order[start : start + batch_rows]
            input_ids = pad_to([src_ids[i] for i in chunk], pad_id, device)
            max_new = min(400, int(1.6 * input_ids.shape[1]) + 10)
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=(input_ids != pad_id).long(),
                max_new_tokens=max_new,
                **gen_kwargs,
            )
            for i, row in zip(chunk, gen.tolist(), strict=True):
                outputs[i] = row
    return outputs


def train_nllb(args, out_dir: Path, budget_s: float) -> dict:
    import _tiny_nllb_training as tnt
    import sacrebleu
    from transformers import GenerationConfig, NllbMoeForConditionalGeneration

    data = Path(args.data_dir)
    train_pairs = read_pairs(data / "en-de.train.tsv.gz")
    test_pairs = read_pairs(data / "en-de.test.tsv.gz")
    if args.eval_limit:
        test_pairs = test_pairs[: args.eval_limit]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    both_sides = [s for s, _ in train_pairs] + [t for _, t in train_pairs]
    tok = train_tokenizer(both_sides, args.nllb_vocab, specials, [SRC_LANG, TGT_LANG])
    hf_tok = wrap_tokenizer(
        tok,
        f"{SRC_LANG} $A </s>",
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=[SRC_LANG, TGT_LANG],
    )
    ids = {t: tok.token_to_id(t) for t in specials + [SRC_LANG, TGT_LANG]}
    pad_id, eos_id = ids["<pad>"], ids["</s>"]
    ml = args.nllb_max_len
    train_src = [[ids[SRC_LANG]] + s + [eos_id] for s in encode(tok, [s for s, _ in train_pairs], ml)]
    train_tgt = [[ids[TGT_LANG]] + t + [eos_id] for t in encode(tok, [t for _, t in train_pairs], ml)]
    test_src = [[ids[SRC_LANG]] + s + [eos_id] for s in encode(tok, [s for s, _ in test_pairs], 3 * ml)]
    test_tgt = [[ids[TGT_LANG]] + t + [eos_id] for t in encode(tok, [t for _, t in test_pairs], 3 * ml)]

    device = args.device
    seed_everything(args.seed)
    # Train-mode capacity over the flattened batch: 2 * ceil(N / E) for a full batch of --max-tokens.
    config = nllb_config(tok.get_vocab_size(), ids, 2 * math.ceil(args.max_tokens / 8), args)
    model = NllbMoeForConditionalGeneration(config).to(device)
    dense_experts = device.type == "cuda" if args.dense_experts == "auto" else args.dense_experts == "on"
    tnt.install(model, dense_experts=dense_experts)
    keep_routers_fp32(model, tnt.modeling_nllb_moe.NllbMoeTop2Router)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[nllb] vocab {config.vocab_size}, params {n_params / 1e6:.2f}M, train pairs {len(train_src)}")

    py_rng = random.Random(args.seed)
    lengths = [max(len(s), len(t)) for s, t in zip(train_src, train_tgt, strict=True)]

    def batches_fn(epoch):
        return length_batches(lengths, args.max_tokens, args.max_rows, py_rng, shuffle=True)

    def make_batch(batch_idx):
        input_ids = pad_to([train_src[i] for i in batch_idx], pad_id, device)
        labels = pad_to([train_tgt[i] for i in batch_idx], -100, device)
        decoder_input_ids = pad_to([[eos_id] + train_tgt[i][:-1] for i in batch_idx], pad_id, device)
        out = model(
            input_ids=input_ids,
            attention_mask=(input_ids != pad_id).long(),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=(labels != -100).long(),
            labels=labels,
            output_router_logits=True,
        )
        aux = config.router_aux_loss_coef * (out.encoder_aux_loss + out.decoder_aux_loss)
        logits = out.logits.flatten(0, 1).float()
        smoothing = args.label_smoothing
        loss = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, label_smoothing=smoothing)
        return loss, aux

    def teacher_forced_nll(src, tgt):
        """Summed NLL (no label smoothing) and target-token count, eval mode, fp32, no grad."""
        model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=device)
        n_tok = 0
        with torch.no_grad():
            lens = [max(len(s), len(t)) for s, t in zip(src, tgt, strict=True)]
            for batch_idx in length_batches(lens, max(8192, args.max_tokens), 64, py_rng, shuffle=False):
                input_ids = pad_to([src[i] for i in batch_idx], pad_id, device)
                labels = pad_to([tgt[i] for i in batch_idx], -100, device)
                out = model(
                    input_ids=input_ids,
                    attention_mask=(input_ids != pad_id).long(),
                    decoder_input_ids=pad_to([[eos_id] + tgt[i][:-1] for i in batch_idx], pad_id, device),
                    decoder_attention_mask=(labels != -100).long(),
                )
                logits = out.logits.flatten(0, 1).float()
                nll += F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum").double()
                n_tok += sum(len(tgt[i]) for i in batch_idx)
        return float(nll), n_tok

    valid_fn = None
    if args.valid_every:
        valid_pairs = read_pairs(data / "en-de.valid.tsv.gz")
        valid_src = [[ids[SRC_LANG]] + s + [eos_id] for s in encode(tok, [s for s, _ in valid_pairs], ml)]
        valid_tgt = [[ids[TGT_LANG]] + t + [eos_id] for t in encode(tok, [t for _, t in valid_pairs], ml)]

        def valid_fn():
            nll, n = teacher_forced_nll(valid_src, valid_tgt)
            return nll / n

    trained = run_training(
        model, make_batch, batches_fn, args, args.nllb_lr, args.warmup, budget_s, "nllb-moe", valid_fn
    )
    steps, seconds = trained["steps"], trained["seconds"]

    gen_kwargs = {
        "decoder_start_token_id": eos_id,
        "forced_bos_token_id": ids[TGT_LANG],
        "num_beams": 1,
        "do_sample": False,
        "no_repeat_ngram_size": args.no_repeat_ngram,
    }
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], pad_token_id=pad_id, eos_token_id=eos_id, **gen_kwargs
    )

    # Expert usage with the correct routing, teacher-forced on the test split.
    sparse = {
        name.removesuffix(".ffn"): m
        for name, m in model.named_modules()
        if isinstance(m, tnt.modeling_nllb_moe.NllbMoeSparseMLP)
    }
    for m in sparse.values():
        m.usage = {
            "top1": torch.zeros(config.num_experts, dtype=torch.float64, device=device),
            "routed": torch.zeros(config.num_experts, dtype=torch.float64, device=device),
            "tokens": 0,
        }
    nll, n_tok = teacher_forced_nll(test_src, test_tgt)
    top1_counts = {k: m.usage["top1"].cpu().numpy() for k, m in sparse.items()}
    routed_counts = {k: m.usage["routed"].cpu().numpy() for k, m in sparse.items()}
    for m in sparse.values():
        del m.usage
    test_ppl = math.exp(nll / n_tok)

    t_gen = time.perf_counter()
    hyp_ids = translate(model, test_src, pad_id, {**gen_kwargs}, args.gen_batch)
    sync(device)
    gen_seconds = time.perf_counter() - t_gen
    hyps = [hf_tok.decode(h, skip_special_tokens=True).strip() for h in hyp_ids]
    refs = [t for _, t in test_pairs]
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu = bleu_metric.corpus_score(hyps, [refs])
    chrf = chrf_metric.corpus_score(hyps, [refs])
    print(f"[nllb] steps {steps}, {seconds / 60:.1f} min, test ppl {test_ppl:.2f}, {bleu}, {chrf}")

    tnt.uninstall()
    model.to("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    hf_tok.save_pretrained(out_dir)
    metrics = {
        "model": NLLB_NAME,
        "architecture": "NllbMoeForConditionalGeneration",
        "task": "English -> German translation of DDTP package descriptions",
        "test_split": "en-de.test.tsv.gz",
        "test_pairs": len(test_pairs),
        "bleu": round(bleu.score, 2),
        "chrf": round(chrf.score, 2),
        "bleu_signature": str(bleu_metric.get_signature()),
        "chrf_signature": str(chrf_metric.get_signature()),
        "bleu_detail": str(bleu),
        "generate_kwargs": gen_kwargs,
        "generate_max_new_tokens": (
            f"min(400, 1.6 * padded source length + 10); {args.gen_batch} rows a batch, by length"
        ),
        "generate_seconds": round(gen_seconds, 1),
        "test_teacher_forced_perplexity": round(test_ppl, 3),
        "vocab_size": config.vocab_size,
        "parameters": n_params,
        **train_metrics(args, trained, args.nllb_lr, "train_final_loss_label_smoothed"),
        "label_smoothing": args.label_smoothing,
        "dropout": config.dropout,
        "max_len_per_side": ml,
        "moe_forward": (
            "correct top-2 sparse MLP (eval/_tiny_nllb_training.py), not transformers 5.x's"
            + (", every expert run on all tokens with zero-weight masking" if dense_experts else "")
        ),
        "expert_usage_test": {
            "definition": (
                "teacher-forced test split, correct routing at eval (capacity fraction 1.0): 'top1' = "
                "fraction of non-padding tokens whose first choice is each expert; 'routed' = fraction of "
                "the (token, expert) slots (first + second choices) that each expert processes"
            ),
            "top1": usage_summary(top1_counts),
            "routed": usage_summary(routed_counts),
        },
        "versions": versions(device),
    }
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["switch", "nllb", "both"], default="both")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "hf_moe_opt" / "assets"))
    p.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "ddtp"))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; cuda trains with bf16 autocast")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA, train in fp32 instead of bf16 autocast")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per model")
    p.add_argument("--nllb-minutes", type=float, default=None, help="override --minutes for NLLB-MoE")
    p.add_argument("--max-steps", type=int, default=0, help="also stop (and schedule the LR) by steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (matters on CPU only)")
    p.add_argument(
        "--max-tokens",
        "--max-tokens-per-batch",
        dest="max_tokens",
        type=int,
        default=2048,
        help="padded tokens per training batch (longest side); NLLB's train capacity is 2*ceil(this/8)",
    )
    p.add_argument("--max-rows", type=int, default=64, help="rows per training batch at most")
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    p.add_argument(
        "--valid-every",
        type=int,
        default=0,
        help="every N steps (and at the end) compute the loss on the valid split and finally keep the best "
        "weights (reads en.valid.txt.gz / en-de.valid.tsv.gz); 0 = off, keep the last weights",
    )
    p.add_argument("--switch-vocab", type=int, default=6000)
    p.add_argument("--switch-max-len", type=int, default=112)
    p.add_argument("--switch-lr", type=float, default=2e-3)
    p.add_argument("--switch-dropout", type=float, default=0.05)
    p.add_argument("--nllb-vocab", type=int, default=8000)
    p.add_argument("--nllb-max-len", type=int, default=128, help="training tokens per side (test: 3x)")
    p.add_argument("--nllb-lr", type=float, default=2e-3)
    p.add_argument("--nllb-dropout", type=float, default=0.1)
    p.add_argument("--nllb-d-model", type=int, default=128)
    p.add_argument("--nllb-ffn-dim", type=int, default=256, help="dense FFN and each expert")
    p.add_argument("--nllb-encoder-layers", type=int, default=4, help="every 2nd layer is sparse")
    p.add_argument("--nllb-decoder-layers", type=int, default=2, help="every 2nd layer is sparse")
    p.add_argument(
        "--dense-experts",
        choices=["auto", "on", "off"],
        default="auto",
        help="NLLB-MoE: run each expert on all tokens with zero-weight masking (same result, no GPU sync); "
        "auto = on for CUDA",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="NLLB generation no_repeat_ngram_size")
    p.add_argument("--gen-batch", type=int, default=48, help="NLLB test sentences per generate() call")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test lines (0 = all)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_everything(args.seed)
    out_root = Path(args.out_dir)
    command = "python eval/train_tiny_models.py " + " ".join(sys.argv[1:] if argv is None else argv)

    jobs = []
    if args.which in ("switch", "both"):
        jobs.append((SWITCH_NAME, train_switch, args.minutes))
    if args.which in ("nllb", "both"):
        jobs.append((NLLB_NAME, train_nllb, args.nllb_minutes or args.minutes))
    for name, fn, minutes in jobs:
        out_dir = out_root / name
        metrics = fn(args, out_dir, minutes * 60.0)
        metrics["command"] = command
        metrics["files_bytes"] = file_sizes(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"[{name}] saved to {out_dir}")


if __name__ == "__main__":
    main()
