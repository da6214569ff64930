"""check_support / `hf-moe-opt check`: what optimize() would do, from a config on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import hf_moe_opt
from hf_moe_opt.assets import shipped_model_path
from hf_moe_opt.cli import main
from hf_moe_opt.patches import derived

from .test_derived_families import QWEN3_MROPE_TEXT
from .test_families import _COMMON, BLOCKS, _blocks, tiny_model


def _expert_bytes(model, dtype_size: int) -> list[int]:
    """Bytes of each sparse block's experts in a real (loaded) model."""
    return [
        sum(p.numel() for p in layer.get_submodule("experts").parameters()) * dtype_size
        for _, layer in hf_moe_opt.optimized_layers(model)
    ]


@pytest.mark.parametrize("name", ["switch-tiny-ddtp", "nllb-moe-tiny-ddtp", "qwen3-moe-tiny-ddtp"])
def test_shipped_models_against_the_loaded_model(name):
    path = shipped_model_path(name)
    config = transformers.AutoConfig.from_pretrained(path)
    report = hf_moe_opt.check_support(config, dtype=torch.float32)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path)
    total = sum(p.numel() for p in model.parameters()) * 4
    hf_moe_opt.optimize(model, backend="torch")
    layers = hf_moe_opt.optimized_layers(model)
    assert report.supported and not report.unmatched
    assert [layer.name for layer in report.layers] == [name for name, _ in layers]
    assert [layer.family for layer in report.layers] == [layer.family for _, layer in layers]
    assert [layer.num_experts for layer in report.layers] == [layer.weights.num_experts for _, layer in layers]
    assert [layer.num_experts * layer.expert_bytes for layer in report.layers] == _expert_bytes(model, 4)
    assert report.total_bytes == total
    assert report.dense_bytes == total - sum(_expert_bytes(model, 4))
    # bf16 halves every count.
    half = hf_moe_opt.check_support(config)
    assert half.dtype == "bfloat16" and half.total_bytes * 2 == report.total_bytes


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "glm4_moe", "minimax_m2", "granitemoehybrid"])
def test_fused_families_from_their_config(family):
    model = tiny_model(family)
    report = hf_moe_opt.check_support(model)  # a model: its config is used, its weights are not
    assert report.supported and len(report.layers) == len(_blocks(model, family))
    assert {layer.block_class for layer in report.layers} == {BLOCKS[family]}
    assert {layer.family for layer in report.layers} == {family}
    experts = _blocks(model, family)[0].experts
    assert report.layers[0].num_experts == experts.gate_up_proj.shape[0]
    per_expert = sum(p.numel() for p in experts.parameters()) * 2 // experts.gate_up_proj.shape[0]
    assert report.layers[0].expert_bytes == per_expert
    # Whole-step CUDA graphs: what optimize(..., cuda_graphs="step") would say.
    if family == "gpt_oss":
        assert "StaticSlidingWindowLayer" in report.step_graphs and "not available" in report.summary()
    elif family == "granitemoehybrid":
        assert "LinearAttentionLayer" in report.step_graphs
    else:
        assert report.step_graphs is None and 'cuda_graphs="step": available' in report.summary()


def test_models_without_or_with_unsupported_blocks():
    dense = transformers.LlamaConfig(**_COMMON, intermediate_size=40)
    report = hf_moe_opt.check_support(dense)
    assert not report.supported and not report.layers and not report.unmatched
    assert "no sparse MoE block found" in report.summary()
    if getattr(transformers, "Gemma4TextConfig", None) is not None:  # MoE inside the decoder layer: no block
        from .models import GEMMA4_MOE

        report = hf_moe_opt.check_support(transformers.Gemma4TextConfig(**GEMMA4_MOE))
        assert not report.supported and report.unmatched
        assert "Gemma4TextDecoderLayer is not a supported block" in report.summary()


def test_a_drifted_copy_is_reported(monkeypatch):
    module = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    original = module.Glm4MoeTopkRouter.forward
    config = tiny_model("glm4_moe").config
    derived._mismatch.cache_clear()
    monkeypatch.setattr(module.Glm4MoeTopkRouter, "forward", lambda self, x: original(self, x))
    try:
        report = hf_moe_opt.check_support(config)
    finally:
        monkeypatch.undo()
        derived._mismatch.cache_clear()
    assert not report.supported and not report.layers
    assert "Glm4MoeTopkRouter code differs" in report.summary()


def test_gpu_memory_arithmetic():
    config = tiny_model("mixtral").config
    report = hf_moe_opt.check_support(config, gpu_memory=10**9)
    assert report.resident_fraction == 1.0 and "fits whole" in report.summary()
    dense, experts = report.dense_bytes, report.expert_bytes
    half = hf_moe_opt.check_support(config, gpu_memory=dense + experts // 2)
    assert half.resident_fraction == pytest.approx((experts // 2) / experts)
    assert "about 50% of the experts fit" in half.summary()
    none = hf_moe_opt.check_support(config, gpu_memory=f"{dense - 1}B")
    assert none.resident_fraction == 0.0 and "does not fit" in none.summary()
    assert hf_moe_opt.check_support(config).resident_fraction is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": 3}, TypeError, "config, a model or a name"),
        ({"model": torch.nn.Linear(2, 2)}, TypeError, "with a .config"),
        ({"dtype": torch.int8}, TypeError, "floating torch.dtype"),
        ({"gpu_memory": 0}, ValueError, "positive"),
        ({"gpu_memory": "lots"}, ValueError, "byte size"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"model": tiny_model("mixtral").config, **kwargs}
    with pytest.raises(error, match=match):
        hf_moe_opt.check_support(kwargs.pop("model"), **kwargs)


def test_cli_check(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["check", "nllb-moe-tiny-ddtp", "--gpu-memory", "5MiB", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 sparse MoE blocks optimize() replaces (nllb-moe; 8 experts" in printed and "supported" in printed
    data = json.loads(out.read_text())
    assert data["supported"] and len(data["layers"]) == 3 and data["gpu_bytes"] == 5 * 2**20
    assert data["expert_bytes"] + data["dense_bytes"] == data["total_bytes"]
    # A dense model: exit status 1; a missing folder: a one-line error, exit status 2.
    folder = tmp_path / "dense"
    transformers.LlamaConfig(**_COMMON, intermediate_size=40).save_pretrained(folder)
    assert main(["check", str(folder)]) == 1
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["check", "switch-tiny-ddtp", "--json", str(tmp_path)]) == 2  # a folder, not a file


def test_a_vision_language_model_is_built_with_its_generating_class():
    if getattr(transformers, "Qwen3VLMoeConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL-MoE")
    text = dict(QWEN3_MROPE_TEXT)
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4)
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=63)
    report = hf_moe_opt.check_support(config)
    assert report.model_class == "Qwen3VLMoeForConditionalGeneration"
    assert report.supported and [layer.family for layer in report.layers] == ["qwen3_vl_moe"] * 2
    assert "generate()" not in (report.step_graphs or "")


def test_llama4_is_built_as_its_checkpoints_are():
    """Llama 4 has a causal-LM class too, which holds the text model alone; the report is about the
    vision-language model its checkpoints hold (vision tower bytes included), and, from the text
    config alone, about the causal LM. Every other layer is MoE here, as in Maverick."""
    if getattr(transformers, "Llama4Config", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Llama 4")
    text = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=24,
        intermediate_size_mlp=40,
        num_local_experts=16,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    full = hf_moe_opt.check_support(transformers.Llama4Config(text_config=text, vision_config=vision))
    alone = hf_moe_opt.check_support(transformers.Llama4TextConfig(**text))
    assert full.model_class == "Llama4ForConditionalGeneration" and alone.model_class == "Llama4ForCausalLM"
    for report in (full, alone):
        assert report.supported and [layer.family for layer in report.layers] == ["llama4"] * 2
        # 16 experts of (32 x 48 + 24 x 32) bf16 values each.
        assert all(layer.num_experts == 16 and layer.expert_bytes == 2 * (32 * 48 + 24 * 32) for layer in report.layers)
        assert "StaticSlidingWindowLayer" in report.step_graphs
    assert full.expert_bytes == alone.expert_bytes and full.total_bytes > alone.total_bytes
