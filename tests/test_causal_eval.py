"""The shipped causal MoE checkpoint (qwen3-moe-tiny-ddtp): eval-lm end to end, optimize / restore / generate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import hf_moe_opt
from hf_moe_opt.assets import SHIPPED_MODELS, shipped_model_path
from hf_moe_opt.cli import main
from hf_moe_opt.evaluation.common import resolve_model

NAME = "qwen3-moe-tiny-ddtp"
REPO = Path(__file__).resolve().parent.parent
DDTP_TEST = REPO.parent / "shared" / "data" / "ddtp" / "en.test.txt.gz"

# Sentences written for these tests (used when the DDTP data is not next to the checkout).
ENGLISH = [
    "this package provides a small command line tool for reading data files",
    "the library offers helper functions for parsing configuration files",
    "a simple program that shows the status of the network interfaces",
    "documentation and examples for the graphical user interface toolkit",
    "plugin for the text editor that adds support for a markup language",
    "development files for the image processing library with python bindings",
]
PROMPTS = ["This package provides", "A library for reading", "Python bindings for the image processing"]


def _data(tmp_path: Path) -> Path:
    if DDTP_TEST.is_file():
        return DDTP_TEST
    path = tmp_path / "english.txt"
    path.write_text("\n".join(ENGLISH) + "\n", encoding="utf-8")
    return path


def test_shipped_entry_resolves():
    assert NAME in SHIPPED_MODELS
    path = shipped_model_path(NAME)
    assert resolve_model(NAME) == (str(path), "shipped")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]


def test_eval_lm_shipped_causal_unchanged(tmp_path):
    out = tmp_path / "lm.json"
    argv = ["eval-lm", "--model", NAME, "--data", str(_data(tmp_path)), "--limit", "12", "--max-length", "64"]
    argv += ["--generate-samples", "3", "--max-new-tokens", "8", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "lm_perplexity" and report["baseline"] == "original"
    assert report["model_source"] == f"hf_moe_opt/assets/{NAME}"
    task = report["task_settings"]
    assert task["objective"].startswith("causal") and task["window"] == 64 and task["stride"] == 32
    assert task["generation_check"]["samples"] == 3
    cmp = report["comparisons"]["optimized_vs_original"]
    assert abs(cmp["perplexity_rel_diff"]) <= 1e-4
    assert cmp["generation"]["all_identical"] and cmp["generation"]["sequences"] == 3
    assert report["unchanged"]["unchanged"] is True
    assert report["unchanged"]["generated_tokens_identical"] is True
    ppl = report["phases"]["original"]["perplexity"]
    assert 1.0 < ppl < 1000.0  # trained: far below the uniform 6000
    for phase in report["phases"].values():
        assert phase["tokens_scored"] == task["tokens"] - 1 and phase["generation"]["new_tokens"] > 0


def test_optimize_restore_generate_identical():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_model_path(NAME)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tok(PROMPTS, return_tensors="pt", padding=True)  # left padding, BOS prepended
    assert tok.padding_side == "left" and bool((batch["input_ids"][:, -1] != tok.pad_token_id).all())
    gen = {"max_new_tokens": 12, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        logits = model(**batch).logits
        want = model.generate(**batch, **gen)

        hf_moe_opt.optimize(model)
        assert hf_moe_opt.is_optimized(model)
        assert len(hf_moe_opt.optimized_layers(model)) == model.config.num_hidden_layers
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(model(**batch).logits[real], logits[real], atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(**batch, **gen), want)

        hf_moe_opt.restore(model)
        assert not hf_moe_opt.is_optimized(model)
        assert torch.equal(model.generate(**batch, **gen), want)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    texts = tok.batch_decode(want[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.strip() for t in texts)
