"""Families whose MoE block copies another family's code (hf_moe_opt.patches.derived): the code
comparison that decides whether they are matched, and what happens when the copy has drifted.
Each family's outputs against transformers are tested with the others in test_families.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

import hf_moe_opt
from hf_moe_opt.patches import derived
from hf_moe_opt.patches.derived import derived_patches, same_class_code, same_code

from .test_families import _COMMON, FAMILIES, KNOWN_DRIFT, VOCAB, _ids, _spread, tiny_model

# The text config of the Qwen3 vision/omni models' language models (multimodal rotary sections).
QWEN3_MROPE_TEXT = dict(
    _COMMON,
    head_dim=8,
    intermediate_size=40,
    moe_intermediate_size=24,
    num_experts=6,
    num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
)


def _scaled(x):
    """Doubles x."""
    return x * 2.0


def _scaled_again(x):
    """The same code under another name and docstring."""
    return x * 2.0


def _scaled_more(x):
    return x * 3.0


def _through_helper(x):
    return _scaled(x)


def _through_other_helper(x):
    return _scaled_more(x)


def _sqrt(x):
    return math.sqrt(x)


def test_same_code_compares_code_names_constants_and_globals():
    assert same_code(_scaled, _scaled_again)
    assert not same_code(_scaled, _scaled_more)  # a constant differs
    assert not same_code(_through_helper, _through_other_helper)  # the names they call differ
    # The same name resolving to another object in the function's module (source compiled alike: the
    # bytecode of a call depends on whether the name was bound by an import).
    source = "import {} as math\n\ndef _sqrt(x):\n    return math.sqrt(x)\n"
    namespace = {}
    exec(source.format("torch"), namespace)  # torch.sqrt, not math.sqrt
    assert not same_code(_sqrt, namespace["_sqrt"])
    same = {}
    exec(source.format("math"), same)
    assert same_code(_sqrt, same["_sqrt"])
    # A global function with different code behind the same name.
    helper = {}
    exec("def _scaled(x):\n    return x * 5.0\n\ndef _through_helper(x):\n    return _scaled(x)\n", helper)
    assert not same_code(_through_helper, helper["_through_helper"])


def test_same_class_code_needs_the_same_methods():
    class A(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 1

        def forward(self, x):
            return x + 1

    class B(torch.nn.Module):
        def __init__(self):  # another __init__ is fine: it only stores values
            super().__init__()
            self.k = 2

        def forward(self, x):
            return x + 1

    class C(B):
        def extra(self):
            return 0

    assert same_class_code(A, B)
    assert not same_class_code(A, C)


@pytest.fixture
def fresh_checks():
    derived._mismatch.cache_clear()
    yield
    derived._mismatch.cache_clear()


def test_installed_copies_are_matched():
    # Every family the tests run against transformers is matched in the installed version (its code
    # still equals the family it copies); others may have drifted there (Granite MoE SWA's block in
    # 5.17 unpacks its router's outputs in another order than Granite MoE's) and are then refused.
    for patch in derived_patches():
        if patch._hf(patch.block_class_name) is None:
            continue
        if patch.model_type in KNOWN_DRIFT and patch.mismatch() is not None:
            assert KNOWN_DRIFT[patch.model_type] in patch.mismatch()  # changed where expected, and refused
            assert patch.block_class() is None
        elif patch.model_type in FAMILIES:
            assert patch.mismatch() is None, patch.model_type
            assert patch.block_class() is not None and patch.router_class is not None
        elif patch.mismatch() is not None:
            assert patch.block_class() is None


def test_drifted_copy_is_refused_with_the_reason(fresh_checks, monkeypatch):
    """A transformers whose GLM-4.5 router no longer equals DeepSeek-V3's: the family is not matched
    and optimize() says why, instead of routing as DeepSeek-V3 does."""
    module = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    original = module.Glm4MoeTopkRouter.forward

    def forward(self, hidden_states):  # e.g. a new routing option
        return original(self, hidden_states * 1.0)

    model = tiny_model("glm4_moe")
    monkeypatch.setattr(module.Glm4MoeTopkRouter, "forward", forward)
    drifted = r"changed code .*Glm4MoeMoE is not matched: its Glm4MoeTopkRouter code differs"
    with pytest.raises(ValueError, match=drifted):
        hf_moe_opt.optimize(model)
    assert not hf_moe_opt.is_optimized(model)
    monkeypatch.undo()
    derived._mismatch.cache_clear()
    hf_moe_opt.optimize(model, backend="torch")
    assert len(hf_moe_opt.optimized_layers(model)) == 1


def test_drifted_copy_beside_matched_blocks_is_named(fresh_checks, monkeypatch):
    # A model with a matched family's blocks and a drifted family's block: the first are optimized, the
    # other runs as transformers' and the warning names it with the reason.
    module = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    original = module.Glm4MoeTopkRouter.forward
    model = tiny_model("mixtral")
    model.model.layers[0].mlp = tiny_model("glm4_moe").model.layers[-1].mlp  # same hidden size
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    monkeypatch.setattr(module.Glm4MoeTopkRouter, "forward", lambda self, x: original(self, x))
    with pytest.warns(UserWarning, match=r"left 1 .*layers\.0\.mlp \(Glm4MoeMoE is not matched: its Glm4MoeTopkRouter"):
        hf_moe_opt.optimize(model, backend="torch")
    assert [name for name, _ in hf_moe_opt.optimized_layers(model)] == ["model.layers.1.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=2e-5)


def test_qwen3_vl_moe_text_model_matches_transformers():
    """Qwen3-VL-MoE: the MoE blocks of the language model inside the vision-language model; text-only
    input, logits and restore against transformers."""
    if getattr(transformers, "Qwen3VLMoeConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL-MoE")
    text = dict(QWEN3_MROPE_TEXT)
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=24,
        num_heads=2,
        out_hidden_size=32,
        patch_size=4,
        spatial_merge_size=1,
        temporal_patch_size=1,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    config = transformers.Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
    )
    torch.manual_seed(0)
    ref = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    _spread(ref)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    layers = hf_moe_opt.optimized_layers(opt)
    assert len(layers) == 2
    assert all(layer.family == "qwen3_vl_moe" and layer.activation.name == "glu_silu" for _, layer in layers)
    ids = _ids()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        torch.testing.assert_close(opt(input_ids=ids).logits, expected, atol=2e-5, rtol=2e-5)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_optimized_model_unpickles_where_its_router_class_was_never_built(monkeypatch):
    # A model saved whole (torch.save) and loaded in a fresh process: the router's class, made at
    # run time, is found by name in hf_moe_opt.patches.derived and built on demand.
    import pickle

    model = tiny_model("glm4_moe")
    hf_moe_opt.optimize(model, backend="torch")
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    blob = pickle.dumps(model)
    monkeypatch.delitem(vars(derived), "OptimizedGlm4MoeTopkRouter")  # as in a fresh process
    derived._router_class.cache_clear()
    loaded = pickle.loads(blob)
    assert type(loaded.model.layers[-1].mlp.gate) is derived.OptimizedGlm4MoeTopkRouter
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    derived._router_class.cache_clear()


@pytest.mark.parametrize("part", ["thinker", "talker"])
def test_qwen3_omni_moe_text_models_match_transformers(part):
    """Qwen3-Omni-MoE holds two families: the thinker's blocks are Qwen3-MoE's, the talker's Qwen2-MoE's
    (with a shared expert). Their text models against transformers, and restore."""
    if getattr(transformers, "Qwen3OmniMoeTextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-Omni-MoE")
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as omni

    text = dict(QWEN3_MROPE_TEXT)
    if part == "thinker":
        ref = omni.Qwen3OmniMoeThinkerTextModel(transformers.Qwen3OmniMoeTextConfig(**text))
        inputs = {"input_ids": _ids()}
    else:
        config = transformers.Qwen3OmniMoeTalkerTextConfig(**text, shared_expert_intermediate_size=20)
        ref = omni.Qwen3OmniMoeTalkerModel(config)  # it takes embeddings from the thinker
        inputs = {"inputs_embeds": torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0))}
    ref.eval()
    _spread(ref)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    family = "qwen3_omni_moe" if part == "thinker" else "qwen3_omni_moe_talker"
    assert [layer.family for _, layer in hf_moe_opt.optimized_layers(opt)] == [family, family]
    with torch.no_grad():
        expected = ref(**inputs).last_hidden_state
        torch.testing.assert_close(opt(**inputs).last_hidden_state, expected, atol=2e-5, rtol=2e-5)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(**inputs).last_hidden_state, expected, atol=0, rtol=0)


# Block fields plus what the full configs' validation asks (DSA attention without rotary dims, an
# indexer pool dividing its top-k).
_LIMITED = dict(
    _COMMON, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8,
    num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
    swiglu_limit=0.5, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=0, v_head_dim=8,
    index_topk=16, index_kpool=4, index_head_dim=8, index_n_heads=2,
)  # fmt: skip


@pytest.mark.parametrize(
    ("config_name", "module", "block", "extra"),
    [
        ("Glm5NextTextConfig", "glm5_next", "Glm5NextTextMoE", {}),
        (
            "HYV4VLTextConfig",
            "hy_v4_vl",
            "HYV4VLMoE",
            dict(
                qk_nope_head_dim=4,
                qk_rope_head_dim=6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 1]},
            ),
        ),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_limited_swiglu_copies_match_transformers(config_name, module, block, extra, dtype):
    """GLM-5-Next's and HY-V4-VL's MoE blocks (HY-V4's code under other names; their whole models
    need sparse-attention and vision settings beyond a tiny test): the optimized block against
    transformers' on random tokens, with a swiglu_limit that binds."""
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    fields = {k: v for k, v in {**_LIMITED, **extra}.items() if hasattr(config_cls, k)}
    config = config_cls(**fields)
    mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[block])
    torch.manual_seed(0)
    hf_block = getattr(mod, block)(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        hf_block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.1)
    hf_block = hf_block.to(dtype)
    from hf_moe_opt.patches import find_patch

    patch = find_patch(hf_block)
    assert patch is not None and patch.model_type == module
    layer = patch.build(copy.deepcopy(hf_block), config, capacity="model", backend="torch")
    assert layer.activation.glu == "limited_swiglu" and layer.activation.limit == 0.5
    x = (torch.randn(2, 7, 32, generator=g) * 2).to(dtype)
    with torch.no_grad():
        want, got = hf_block(x), layer(x)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)


# DeepSeek-V2's routing, softmax group-limited (the OCR models' language models copy V2's block).
_V2_TEXT = dict(
    _COMMON, intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
    n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=1.5, topk_method="group_limited_greedy",
    kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
    num_key_value_heads=4,
)  # fmt: skip


@pytest.mark.parametrize(
    ("config_name", "module", "block"),
    [
        ("DeepseekOcr2TextConfig", "deepseek_ocr2", "DeepseekOcr2TextMoe"),
        ("UnlimitedOcrTextConfig", "unlimited_ocr", "UnlimitedOcrTextMoe"),
    ],
)
def test_deepseek_v2_copies_match_transformers_and_keep_its_checks(config_name, module, block):
    """The OCR models' DeepSeek-V2 blocks: the optimized block against transformers' (fp32), and
    DeepSeek-V3's ``noaux_tc`` refused as for DeepSeek-V2 itself (its router cannot run it)."""
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[block])
    from hf_moe_opt.patches import find_patch

    config = config_cls(**{k: v for k, v in _V2_TEXT.items() if hasattr(config_cls, k)})
    torch.manual_seed(0)
    hf_block = getattr(mod, block)(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    patch = find_patch(hf_block)
    if patch is None:  # this transformers' copy differs from DeepSeek-V2's: refused, as it must be
        assert any(p.model_type == module and p.mismatch() for p in derived_patches())
        return
    assert patch.model_type == module
    layer = patch.build(copy.deepcopy(hf_block), config, capacity="model", backend="torch")
    x = torch.randn(2, 7, 32, generator=g) * 2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hf_block(x), atol=2e-5, rtol=2e-5)
    hf_block.gate.topk_method = "noaux_tc"
    with pytest.raises(ValueError, match="topk_method='noaux_tc'"):
        patch.build(copy.deepcopy(hf_block), config, capacity="model", backend="torch")


@pytest.mark.parametrize("family", ["minicpm5_moe", "deepseek_v3"])
def test_router_logits_under_autocast_as_transformers(family):
    """MiniCPM5-MoE's router (DeepSeek-V3's routing) turns autocast off around its float32 logits;
    DeepSeek-V3's own does not. Under CPU bf16 autocast each optimized router does what its
    transformers router does."""
    from .test_families import _blocks

    model = tiny_model(family)
    hf_router = copy.deepcopy(_blocks(model, family)[0].gate)
    hf_moe_opt.optimize(model, backend="torch")
    (_, layer), *_ = hf_moe_opt.optimized_layers(model)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = hf_router(x), layer.gate(x)
    assert got[0].dtype == want[0].dtype == (torch.float32 if family == "minicpm5_moe" else torch.bfloat16)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    assert torch.equal(got[2].sort(-1).values, want[2].sort(-1).values)
