"""The evaluation commands (eval-lm, eval-mt): end to end on small models, argument errors, data formats."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_moe_opt.cli import main
from hf_moe_opt.evaluation import lm, mt
from hf_moe_opt.evaluation.common import DataSpec, EvalError, asset_dir, read_local, resolve_model

REPO = Path(__file__).resolve().parent.parent
DDTP = REPO.parent / "shared" / "data" / "ddtp"
SWITCH = asset_dir("switch-tiny-ddtp")
NLLB = asset_dir("nllb-moe-tiny-ddtp")

# Sentences written for these tests.
ENGLISH = [
    "this package provides a small command line tool for reading data files",
    "the library offers helper functions for parsing configuration files",
    "a simple program that shows the status of the network interfaces",
    "documentation and examples for the graphical user interface toolkit",
    "plugin for the text editor that adds support for a markup language",
    "development files for the image processing library with python bindings",
    "a fast compression tool with support for large archives and streams",
    "the server daemon handles requests from many clients at the same time",
    "fonts with many glyphs for use in documents and on the desktop",
    "utilities to convert between several audio formats on the command line",
    "a game where the player builds cities and manages their resources",
    "translations of the manual pages into several languages",
]
GERMAN = [
    "dieses Paket bietet ein kleines Werkzeug zum Lesen von Dateien",
    "die Bibliothek bietet Hilfsfunktionen zum Einlesen von Dateien",
    "ein einfaches Programm, das den Zustand der Netzwerke zeigt",
    "Dokumentation und Beispiele für die grafische Oberfläche",
]
PAIRS = [(ENGLISH[i], GERMAN[i]) for i in range(len(GERMAN))]


def _run(argv: list[str], tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main([*argv, "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _lines_file(tmp_path: Path, repeat: int = 1) -> Path:
    path = tmp_path / "english.txt"
    path.write_text("\n".join(ENGLISH * repeat) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tiny models
def _tiny_switch(folder: Path, expert_capacity: int) -> Path:
    """A random Switch model that uses the shipped tokenizer (sentinels included), small capacity."""
    from transformers import AutoTokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(SWITCH)
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(
        vocab_size=len(tok),
        d_model=16,
        d_ff=32,
        d_kv=4,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_experts=4,
        expert_capacity=expert_capacity,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.classifier" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _tiny_nllb(folder: Path) -> Path:
    """A random NLLB-MoE model with a word-level tokenizer over the test sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GenerationConfig, NllbMoeConfig, NllbMoeForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "eng_Latn", "deu_Latn"]
    words = sorted({w for s in ENGLISH + GERMAN for w in s.replace(",", " ,").split()})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="eng_Latn $A </s>", special_tokens=[("eng_Latn", 4), ("</s>", 2)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["eng_Latn", "deu_Latn"],
    )
    torch.manual_seed(0)
    cfg = NllbMoeConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_experts=4,
        expert_capacity=64,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        moe_token_dropout=0.1,
    )
    model = NllbMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.classifier" in name:
                p.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=5
    )
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- end to end
def test_eval_lm_shipped_switch_unchanged(tmp_path, monkeypatch):
    # Without the DDTP split next to the checkout: the test sentences, twice (16 are read).
    data = DDTP / "en.test.txt.gz" if (DDTP / "en.test.txt.gz").is_file() else _lines_file(tmp_path, repeat=2)
    monkeypatch.chdir(tmp_path)  # the shipped model named by its package path from outside the checkout
    args = ["eval-lm", "--model", "hf_moe_opt/assets/switch-tiny-ddtp", "--data", str(data.resolve())]
    args += ["--limit", "16", "--batch-size", "8"]
    report = _run([*args, "--generate-samples", "4", "--max-new-tokens", "8"], tmp_path, "lm")
    from hf_moe_opt.evaluation.common import transformers_switch_applies_capacity

    # Versions whose Switch block never applies capacity get the reference phase too (nothing drops here).
    baseline = "original" if transformers_switch_applies_capacity() else "reference"
    assert report["task"] == "lm_perplexity" and report["baseline"] == baseline
    assert report["task_settings"]["sequences"] == 16
    for key in sorted({"optimized_vs_original", f"optimized_vs_{baseline}"}):
        cmp = report["comparisons"][key]
        assert abs(cmp["perplexity_rel_diff"]) <= 1e-4
        assert cmp["generation"]["all_identical"] and cmp["generation"]["sequences"] == 4
    assert report["unchanged"]["unchanged"] is True
    ppl = report["phases"]["original"]["perplexity"]
    assert 1.0 < ppl < 2000.0  # trained: far below the uniform 6000
    for phase in report["phases"].values():
        assert phase["tokens_per_second"] > 0 and phase["weight_bytes"] > 0
    assert "versions" in report and report["command"].startswith("hf-moe-opt eval-lm")
    assert report["model_source"] == "hf_moe_opt/assets/switch-tiny-ddtp"


def test_eval_lm_capacity_none_changes_only_dropped(tmp_path):
    from hf_moe_opt.evaluation.common import transformers_switch_applies_capacity

    model = _tiny_switch(tmp_path / "switch", expert_capacity=2)
    data = _lines_file(tmp_path)
    common = ["eval-lm", "--model", str(model), "--data", str(data), "--generate-samples", "2"]
    report = _run([*common, "--capacity", "none"], tmp_path, "none")
    drops = report["dropped_by_original"]
    assert drops["dropped"] > 0 and 0 < drops["share"] < 1
    # transformers 5.0-5.17 never drop: the report adds the block with capacity as its reference.
    old = not transformers_switch_applies_capacity()
    assert any("never applies expert capacity" in n for n in report["notes"]) == old
    assert report["baseline"] == ("reference" if old else "original")
    cmp = report["comparisons"][f"optimized_vs_{report['baseline']}"]
    if old:  # capacity="none" is exactly the old versions' own forward
        assert report["comparisons"]["optimized_vs_original"]["max_abs_token_nll_diff"] == 0.0
    assert cmp["sequences_with_dropped_tokens"] > 0
    assert cmp["sequences_changed_without_any_drop"] == 0
    assert report["unchanged"]["changes_only_where_original_drops"] is True
    assert cmp["max_abs_token_nll_diff"] > 1e-3  # dropping vs not dropping does change the output
    # capacity="model" reproduces the drops: unchanged.
    same = _run([*common, "--capacity", "model"], tmp_path, "model")
    assert same["unchanged"]["unchanged"] is True
    # "changed without a drop" answers the capacity="none" question only (as eval-mt reports it).
    same_cmp = same["comparisons"][f"optimized_vs_{same['baseline']}"]
    assert not [k for k in same_cmp if "drop" in k]
    assert same["dropped_by_original"]["dropped"] == drops["dropped"]


def test_switch_capacity_probe_matches_the_known_versions():
    import transformers
    from packaging.version import Version

    from hf_moe_opt.evaluation.common import transformers_switch_applies_capacity

    version = Version(transformers.__version__)
    if Version("5.0") <= version <= Version("5.17.99"):
        assert transformers_switch_applies_capacity() is False  # the router's cumsum over a size-1 dim
    elif version >= Version("5.23") or version < Version("5.0"):
        assert transformers_switch_applies_capacity() is True
    else:
        pytest.skip(f"transformers {version}: between the versions checked")


def test_eval_mt_nllb_against_correct_reference(tmp_path):
    # The shipped checkpoint when present (a random tiny one otherwise), on sentences written here.
    model = NLLB if (NLLB / "config.json").is_file() else _tiny_nllb(tmp_path / "nllb")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS), encoding="utf-8")
    args = ["eval-mt", "--model", str(model), "--data", str(data), "--metrics", "sacrebleu", "--max-new-tokens", "12"]
    report = _run(args, tmp_path, "mt")
    assert report["task"] == "mt_bleu"
    from hf_moe_opt.evaluation.common import transformers_nllb_block_is_correct

    if not transformers_nllb_block_is_correct():
        assert report["baseline"] == "reference" and set(report["phases"]) == {"original", "reference", "optimized"}
        assert any("wrong" in n for n in report["notes"])
        assert "optimized_vs_original" in report["comparisons"]
    cmp = report["comparisons"][f"optimized_vs_{report['baseline']}"]
    assert cmp["generation"]["all_identical"]
    assert cmp["bleu_diff"] == 0.0 and cmp["chrf_diff"] == 0.0
    assert abs(cmp["perplexity_rel_diff"]) <= 1e-4
    assert report["unchanged"]["unchanged"] is True
    assert report["phases"]["optimized"]["metrics_backend"].startswith("sacrebleu")


# ----------------------------------------------------------------------------- argument errors
def _error_line(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval-lm", "--data", "/nonexistent/file.txt"], "does not exist"),
        (["eval-lm", "--dtype", "int8"], "unknown dtype"),
        (["eval-lm", "--device", "tpu"], "device"),
        (["eval-lm", "--limit", "0"], "--limit"),
        (["eval-lm", "--batch-size", "-1"], "--batch-size"),
        (["eval-lm", "--limit", "ten"], "invalid int"),
        (["eval-lm", "--capacity", "half"], "capacity"),
        (["eval-lm", "--backend", "magic"], "backend"),
        (["eval-lm", "--model", "./no/such/model"], "does not exist"),
        (["eval-lm", "--data", "x.txt", "--dataset", "y"], "either"),
        (["eval-lm", "--split", "validation"], "--split needs --dataset"),
        (["eval-mt", "--num-beams", "0"], "--num-beams"),
        (["eval-mt", "--metrics", "meteor"], "--metrics"),
        (["eval-lm", "--json", str(Path(__file__).parent)], "is a folder"),
        # options of the other model kind are refused, not ignored (the default model is seq2seq)
        (["eval-lm", "--stride", "16"], "--stride does not apply to seq2seq models"),
        (["eval-lm", "--model", "qwen3-moe-tiny-ddtp", "--batch-size", "8"], "--batch-size does not apply to causal"),
        (["eval-lm", "--model", "qwen3-moe-tiny-ddtp", "--corruption-seed", "3"], "--corruption-seed does not apply"),
    ],
)
def test_bad_arguments_one_line(capsys, argv, needle):
    assert needle in _error_line(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda(capsys):
    assert "CUDA" in _error_line(capsys, ["eval-mt", "--device", "cuda"])


def test_cli_process_exit_code():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "lm_perplexity.py"), "--limit", "-3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--limit" in proc.stderr


def test_missing_fields_and_formats(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"body": "a"}\n')
    with pytest.raises(EvalError, match="no field 'text'"):
        read_local(DataSpec(path=jsonl), pairs=False)
    with pytest.raises(EvalError, match="TSV or JSON lines"):
        read_local(DataSpec(path=_lines_file(tmp_path)), pairs=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(EvalError, match="not valid JSON"):
        read_local(DataSpec(path=bad), pairs=False)


# ----------------------------------------------------------------------------- data formats
def test_local_formats_lm(tmp_path):
    texts = ENGLISH[:3]
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n\n")
    for gz in ("a.txt.gz", "b.txt.GZ"):  # the suffix in either case
        with gzip.open(tmp_path / gz, "wt", encoding="utf-8") as f:
            f.write("\n".join(texts) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "a.tsv").write_text("".join(f"{t}\tignored\n" for t in texts))
    for name in ("a.txt", "a.txt.gz", "b.txt.GZ", "a.jsonl", "a.tsv"):
        assert read_local(DataSpec(path=tmp_path / name), pairs=False) == texts, name
    assert read_local(DataSpec(path=tmp_path / "a.tsv", text_field="1"), pairs=False) == ["ignored"] * 3
    with pytest.raises(EvalError, match="column number"):  # never silently column 0
        read_local(DataSpec(path=tmp_path / "a.tsv", text_field="body"), pairs=False)
    with pytest.raises(EvalError, match="plain text"):  # a field named on plain text is not ignored
        read_local(DataSpec(path=tmp_path / "a.txt", text_field="body"), pairs=False)
    assert read_local(DataSpec(path=tmp_path / "a.txt", limit=2), pairs=False) == texts[:2]


def test_local_formats_mt(tmp_path):
    (tmp_path / "p.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    with gzip.open(tmp_path / "p.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in PAIRS))
    for name in ("p.tsv", "p.tsv.gz", "p.jsonl"):
        assert read_local(DataSpec(path=tmp_path / name), pairs=True) == PAIRS, name
    spec = DataSpec(path=tmp_path / "q.jsonl", source_lang="en", target_lang="de")
    assert read_local(spec, pairs=True) == PAIRS
    with pytest.raises(EvalError, match="--translation-keys"):
        read_local(DataSpec(path=tmp_path / "q.jsonl"), pairs=True)


def test_language_codes_must_be_the_tokenizers():
    """'de' is a subword of the NLLB vocabulary, not its German code: refused with the way out."""
    from transformers import AutoTokenizer

    from hf_moe_opt.assets import shipped_model_path
    from hf_moe_opt.evaluation.mt import _check_language_code

    tok = AutoTokenizer.from_pretrained(shipped_model_path("nllb-moe-tiny-ddtp"))
    assert tok.convert_tokens_to_ids("de") != tok.unk_token_id  # why a token lookup alone cannot tell
    with pytest.raises(EvalError, match="'de' is not a language code.*--translation-keys"):
        _check_language_code(tok, "de", "--target-lang")
    _check_language_code(tok, "deu_Latn", "--target-lang")  # a real code passes


def test_source_lang_sets_the_sources_code():
    """The shipped tokenizer has no src_lang setting (a fixed eng_Latn prefix): --source-lang replaces
    that prefix instead of being checked and then ignored."""
    import argparse

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(NLLB)
    model = AutoModelForSeq2SeqLM.from_pretrained(NLLB)
    assert not hasattr(tok, "src_lang")
    pairs = [("hallo welt", "hello world"), ("guten morgen", "good morning")]
    for code in (None, "deu_Latn"):
        args = argparse.Namespace(source_lang=code, target_lang=None, max_source_length=64)
        sources = mt.prepare(tok, model, pairs, args)["sources"]
        want = tok.convert_tokens_to_ids(code or "eng_Latn")
        assert [ids[0] for ids in sources] == [want, want]
        assert [ids[1:] for ids in sources] == [ids[1:] for ids in tok([s for s, _ in pairs])["input_ids"]]


# ----------------------------------------------------------------------------- pieces
def test_span_corruption_matches_training_script():
    script = REPO / "eval" / "train_tiny_models.py"
    spec = importlib.util.spec_from_file_location("_train_tiny_models", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    gen = np.random.default_rng(7)
    seqs = [list(gen.integers(5, 500, size=int(n))) for n in gen.integers(4, 112, size=40)]
    sentinels = list(range(5900, 6000))
    a, b = np.random.default_rng(1234), np.random.default_rng(1234)
    for s in seqs:
        assert lm.corrupt(s, a, sentinels, 1) == train.span_corrupt(s, b, sentinels, 1)


def test_strided_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (7, 16, 8), (33, 8, 3), (2, 4, 1)]:
        scored = [p for _, end, first in lm.strided_windows(n, window, stride) for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(
            begin < first and end - begin <= window for begin, end, first in lm.strided_windows(n, window, stride)
        )
    with pytest.raises(EvalError):
        lm.strided_windows(10, 4, 4)


def test_metrics_fall_back_to_sacrebleu(monkeypatch):
    pytest.importorskip("sacrebleu")

    def offline(name, allow_download):
        raise FileNotFoundError(f"Couldn't find a module script for {name}")

    monkeypatch.setattr(mt, "_evaluate_metric", offline)
    scores = mt.corpus_scores(["das Paket bietet ein Werkzeug"], ["das Paket bietet ein Werkzeug"], "auto")
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["metrics_backend"].startswith("sacrebleu")
    with pytest.raises(EvalError, match="evaluate could not load"):
        mt.corpus_scores(["a"], ["a"], "evaluate")


def test_resolve_model():
    assert resolve_model("switch-tiny-ddtp") == (str(SWITCH), "shipped")
    assert resolve_model("google/switch-base-8") == ("google/switch-base-8", "hub")
    with pytest.raises(EvalError):
        resolve_model("/definitely/not/here")


def test_hub_names_without_a_network_read_the_local_cache_only(monkeypatch):
    # Offline, a Hub name fails at once with a clear reason instead of retrying for half a minute; a
    # shipped or local folder never asks the network.
    import socket

    from hf_moe_opt.evaluation import common

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(common.socket, "getaddrinfo", no_dns)
    assert not common.hub_reachable()
    with pytest.raises(EvalError, match="cannot be reached from here and it is not in the local cache"):
        common.model_kind("some-org/some-model")
    with pytest.raises(EvalError, match="cannot be reached"):
        common.load_model("some-org/some-model", "causal", torch.float32, torch.device("cpu"))
    assert common.model_kind(str(SWITCH)) == "seq2seq"
    monkeypatch.setattr(common.socket, "getaddrinfo", lambda *args, **kwargs: [])
    assert common.hub_reachable() and common._load_options("some-org/some-model") == {}


# ----------------------------------------------------------------------------- low precision
def test_float32_weights_is_exact_and_in_place():
    from transformers import AutoModelForSeq2SeqLM

    from hf_moe_opt.evaluation.compare import float32_weights

    model = AutoModelForSeq2SeqLM.from_pretrained(SWITCH, dtype=torch.bfloat16).eval()
    before = {n: (p, p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    with float32_weights(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.named_parameters():
        obj, dtype, value = before[n]
        assert p is obj and p.dtype == dtype and torch.equal(p, value), n


def test_eval_mt_bfloat16_differences_are_told_from_changes(tmp_path, capsys):
    """bfloat16 greedy decoding flips near-ties: a float32 re-run of both models tells it is rounding."""
    data = DDTP / "en-de.test.tsv.gz"
    if not data.is_file() or not (NLLB / "config.json").is_file():
        pytest.skip("needs the DDTP test split and the shipped NLLB-MoE model")
    argv = ["eval-mt", "--data", str(data), "--limit", "4", "--dtype", "bfloat16", "--metrics", "sacrebleu"]
    argv += ["--max-new-tokens", "24"]
    out = tmp_path / "mt.json"
    assert main([*argv, "--no-progress", "--fail-if-changed", "--json", str(out)]) == 0
    v = json.loads(out.read_text())["unchanged"]
    printed = capsys.readouterr().out
    assert "indicative only" in printed  # a CPU run says its throughput is rough
    # No token is dropped with capacity="model": changes are not to be read as "changed without a drop".
    assert "changes_only_where_original_drops" not in v and "changed without a drop" not in printed
    assert v["sentences"] == 4 and v["sentences_differing"] >= 0
    if v["unchanged"]:
        pytest.skip("no translation flipped in bfloat16 on this machine")
    check = v["float32_check"]
    assert v["differences_are_rounding"] is True and check["sentences_differing"] == 0
    assert abs(check["perplexity_rel_diff"]) <= 1e-4
    assert f"{v['sentences_differing']}/4 translations differ" in printed and "BFLOAT16 ROUNDING" in printed


def test_lm_verdict_counts_every_token():
    """One changed sequence among thousands moves the corpus perplexity by less than its tolerance:
    the per-token comparison still makes the verdict CHANGED (capacity='model')."""
    from hf_moe_opt.evaluation.lm import unchanged_verdict

    cmp = {"perplexity_rel_diff": 5e-5, "sequences_changed": 0, "token_nll_atol": 1e-3}
    cmp["generation"] = {"all_identical": True, "sequences": 32, "identical_sequences": 32}
    assert unchanged_verdict(cmp, "model", torch.float32, "original")["unchanged"]
    changed = unchanged_verdict({**cmp, "sequences_changed": 1}, "model", torch.float32, "original")
    assert not changed["unchanged"] and changed["perplexity_within_tolerance"] and changed["sequences_changed"] == 1


def test_verdict_line_says_how_much_differs():
    from hf_moe_opt.evaluation.report import verdict_line

    v = {"against": "reference", "capacity": "model", "unchanged": False, "perplexity_within_tolerance": True}
    v |= {"sentences": 48, "sentences_differing": 30, "bleu_diff": 0.02}
    report = {"settings": {"dtype": "bfloat16"}, "unchanged": v}
    line = verdict_line(report)
    assert "30/48 translations differ" in line and "--no-float32-check skipped the float32 re-run" in line
    lm_report = {"settings": {"dtype": "bfloat16"}, "unchanged": {**v, "generations": 32, "generations_differing": 5}}
    for key in ("sentences", "sentences_differing", "bleu_diff"):
        del lm_report["unchanged"][key]
    lm_line = verdict_line(lm_report)
    assert "5/32 greedy generations differ" in lm_line and "a float32 run tells" in lm_line
    lm_report["unchanged"] |= {"sequences_changed": 1, "token_nll_atol": 0.1, "generations_differing": 0}
    assert "1 sequences hold a token NLL beyond 0.1 nats" in verdict_line(lm_report)
    v |= {"differences_are_rounding": False}
    v["float32_check"] = {"sentences_differing": 3, "perplexity_rel_diff": 0.0}
    v["float32_check"]["reference_sentences_differing_from_its_float32_run"] = 20
    line = verdict_line(report)
    assert line.startswith("CHANGED vs reference") and "not bfloat16 rounding" in line


def test_dataset_name_offline_reads_the_cache_only(monkeypatch):
    """With the Hub out of reach a dataset name is looked up in the local cache at once (no half-minute
    of retries), the error says why, and the libraries' offline settings are restored."""
    import time

    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    from hf_moe_opt.evaluation import common

    monkeypatch.setattr(common, "hub_reachable", lambda: False)
    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(EvalError, match="Hub cannot be reached from here and it is not in the local cache"):
        common.read_dataset(DataSpec(dataset="no-such-org/no-such-dataset", split="test"), pairs=False)
    assert time.monotonic() - start < 15
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before


# ----------------------------------------------------------------------------- verdict rules
def test_ppl_tolerance_is_two_sided():
    """ppl_within_tolerance compares |rel_diff| with the dtype's tolerance: a perplexity that drops
    by more than the tolerance is a change too, not only one that rises."""
    from hf_moe_opt.evaluation.common import PPL_RTOL
    from hf_moe_opt.evaluation.compare import ppl_within_tolerance

    tol = PPL_RTOL[torch.float32]
    assert ppl_within_tolerance(0.5 * tol, torch.float32) and ppl_within_tolerance(-0.5 * tol, torch.float32)
    assert not ppl_within_tolerance(2 * tol, torch.float32)
    assert not ppl_within_tolerance(-2 * tol, torch.float32)
    assert not ppl_within_tolerance(-0.5, torch.float32)
    assert not ppl_within_tolerance(-2 * PPL_RTOL[torch.bfloat16], torch.bfloat16)


def test_lm_verdict_capacity_none_needs_identical_generations():
    """capacity='none': equal perplexity is not enough, a differing greedy generation makes it CHANGED."""
    from hf_moe_opt.evaluation.lm import unchanged_verdict

    cmp = {"perplexity_rel_diff": 0.0, "generation": {"all_identical": False, "sequences": 2, "identical_sequences": 1}}
    v = unchanged_verdict(cmp, "none", torch.float32, "original")
    assert v["perplexity_within_tolerance"] is True and v["generations_differing"] == 1
    assert v["unchanged"] is False
    cmp["generation"] = {"all_identical": True, "sequences": 2, "identical_sequences": 2}
    assert unchanged_verdict(cmp, "none", torch.float32, "original")["unchanged"] is True


def test_float32_verdict_needs_identical_float32_translations():
    """The float32 re-run calls the low-precision differences rounding only when the float32
    translations agree too, not on equal perplexity alone."""
    from hf_moe_opt.evaluation.compare import TeacherForcedResult

    def result() -> TeacherForcedResult:
        r = TeacherForcedResult()
        r.token_nll[0] = torch.tensor([0.5, 1.0], dtype=torch.float64)
        r.argmax[0] = torch.tensor([1, 2])
        r.tokens_scored = 2
        return r

    results32 = {"reference": result(), "optimized": result()}  # equal NLLs: perplexity within tolerance
    low = {"reference": {0: [5, 6, 7]}, "optimized": {0: [5, 9, 9]}}
    scores = {"reference": {"bleu": 30.0}, "optimized": {"bleu": 20.0}}
    differ32 = {"reference": {0: [5, 6, 7]}, "optimized": {0: [5, 9, 9]}}
    v = mt.float32_verdict(results32, differ32, scores, low, scores, "reference")
    assert v["float32_check"]["perplexity_within_tolerance"] is True
    assert v["float32_check"]["sentences_differing"] == 1
    assert v["differences_are_rounding"] is False
    same32 = {"reference": {0: [5, 6, 7]}, "optimized": {0: [5, 6, 7]}}
    assert mt.float32_verdict(results32, same32, scores, low, scores, "reference")["differences_are_rounding"]


def test_eval_mt_verdict_counts_differing_translations(tmp_path, monkeypatch):
    """eval-mt: one translation that differs makes the verdict CHANGED even with equal perplexity."""
    model = _tiny_nllb(tmp_path / "nllb")  # random and small: the rule, not the model, is tested
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS[:2]), encoding="utf-8")
    real = mt.compare_generations

    def first_differs(got, want):  # the optimized model's first translation gets one more token
        got = dict(got)
        got[0] = [*got[0], 7]
        return real(got, want)

    monkeypatch.setattr(mt, "compare_generations", first_differs)
    args = ["eval-mt", "--model", str(model), "--data", str(data), "--metrics", "sacrebleu"]
    report = _run([*args, "--max-new-tokens", "4", "--no-float32-check"], tmp_path, "mt")
    v = report["unchanged"]
    assert v["perplexity_within_tolerance"] is True
    assert v["generated_tokens_identical"] is False and v["sentences_differing"] == 1
    assert v["unchanged"] is False


class _Bigram(torch.nn.Module):
    """A deterministic stand-in LM over 5 tokens: the logits at a position are table[input token]."""

    def __init__(self):
        super().__init__()
        self.table = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_teacher_forced_perplexity_is_per_scored_token():
    """teacher_forced counts only labels != -100 and its perplexity is exp(mean NLL over those tokens),
    not over padding and not a mean of per-sequence means."""
    import math

    from hf_moe_opt.evaluation.compare import TeacherForcedBatch, teacher_forced

    model = _Bigram()
    labels = torch.tensor([[1, 2, 3, 4, 0, 1], [2, 3, -100, -100, -100, -100]])
    ids = labels.clamp(min=0)
    batch = TeacherForcedBatch([0, 1], ids, torch.ones_like(ids), labels)
    got = teacher_forced(model, [batch], torch.device("cpu"), "x", progress=False)
    nlls = []
    for row in range(2):
        for t in range(6):
            label = int(labels[row, t])
            if label == -100:
                continue
            logits = [float(x) for x in model.table[int(ids[row, t])]]
            nlls.append(math.log(sum(math.exp(x) for x in logits)) - logits[label])
    assert got.tokens_scored == len(nlls) == 8
    assert got.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-6)
