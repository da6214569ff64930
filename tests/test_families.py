"""Decoder MoE families with fused experts: the optimized model against transformers' own.

For each family a tiny model from a config (random weights, routers scaled so routing is decisive):
logits, greedy generation, router logits, state dict, restore and the capacity modes must match
transformers' model (whose implementations of these families serve as the reference).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import hf_moe_opt
from hf_moe_opt.experts import ExpertWeights, FusedExpertTensor
from hf_moe_opt.experts.activation import Activation, clamped_swiglu_activation, glu_activation
from hf_moe_opt.patches import find_patch
from hf_moe_opt.routing import deepseek_topk, softmax_topk, topk_softmax

VOCAB = 64
FP32 = dict(atol=2e-5, rtol=2e-5)
BF16 = dict(atol=1e-2, rtol=1e-2)  # HF grouped_mm vs eager already differ by ~4e-3 here

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict[str, tuple[str, str, dict]]:
    """``family -> (config class, model class, config kwargs)``: tiny, every routing option exercised."""
    # DeepSeek-V3-style routing (group-limited top-k), and multi-head latent attention: as many
    # key/value heads as query heads.
    v3 = dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)
    dsv = dict(v3, **mla)
    # Eight experts, three per token, and a sliding-window layer before a full-attention one (the newer
    # families' common shape).
    moe8 = dict(head_dim=8, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3)
    swa_full = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    kolibri = dict(moe8, shared_expert_intermediate_size=20, norm_topk_prob=True, sliding_window=8)
    # Multi-head latent attention with a sparse-attention indexer, MoE in the second layer.
    dsa = dict(
        dsv,
        q_lora_rank=12,
        head_dim=8,
        index_topk=4,
        index_head_dim=8,
        index_n_heads=2,
        mlp_layer_types=["dense", "sparse"],
    )
    # Granite with its shared MLP (beside the block, in the decoder layer).
    granite = dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, shared_intermediate_size=20)
    # Hybrid models (gated delta-net and full attention layers) with Qwen2-MoE's shared expert.
    gated_delta = dict(
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=20,
        num_experts=6,
        num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    )
    return {
        "mixtral": (
            "MixtralConfig",
            "MixtralForCausalLM",
            dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            dict(
                intermediate_size=40,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=20,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=False,
            ),
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            ),
        ),
        "olmoe": (
            "OlmoeConfig",
            "OlmoeForCausalLM",
            dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
        ),
        "deepseek_v2": (
            "DeepseekV2Config",
            "DeepseekV2ForCausalLM",
            dict(
                dsv,
                topk_method="group_limited_greedy",
                routed_scaling_factor=1.5,
                q_lora_rank=None,
                head_dim=4,
            ),
        ),
        "deepseek_v3": (
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            dict(dsv, q_lora_rank=12),
        ),
        "gpt_oss": (
            "GptOssConfig",
            "GptOssForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                num_local_experts=6,
                num_experts_per_tok=2,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
        ),
        "minimax_m2": (
            "MiniMaxM2Config",
            "MiniMaxM2ForCausalLM",
            dict(head_dim=8, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        ),
        "ernie4_5_moe": (
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                moe_num_experts=6,
                moe_k=3,
                moe_num_shared_experts=1,
                moe_layer_start_index=1,
            ),
        ),
        "granitemoe": (
            "GraniteMoeConfig",
            "GraniteMoeForCausalLM",
            dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        ),
        "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(dsv, norm_topk_prob=False)),
        "hunyuan_v1_moe": (
            "HunYuanMoEV1Config",
            "HunYuanMoEV1ForCausalLM",
            dict(head_dim=8, intermediate_size=24, num_experts=6, moe_topk=2),
        ),
        "lfm2_moe": (
            "Lfm2MoeConfig",
            "Lfm2MoeForCausalLM",
            dict(
                intermediate_size=40,
                moe_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                num_dense_layers=0,
                use_expert_bias=True,
                routed_scaling_factor=1.5,
                layer_types=["conv", "full_attention"],
            ),
        ),
        # Experts fed router-scaled copies of the tokens; top-2 exercises the copies' sum (every
        # released Llama 4 routes top-1: test_llama4_top1_interleaved).
        "llama4": (
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                intermediate_size_mlp=40,
                num_local_experts=6,
                num_experts_per_tok=2,
                interleave_moe_layer_step=1,
            ),
        ),
        # A wide routing margin, so both of SparseMixer's masked softmaxes keep several experts.
        "phimoe": (
            "PhimoeConfig",
            "PhimoeForCausalLM",
            dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.3),
        ),
        "cohere2_moe": (
            "Cohere2MoeConfig",
            "Cohere2MoeForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                num_shared_experts=1,
                shared_expert_combination_strategy="average",
            ),
        ),
        # MoE in both layers, one Mamba and one attention layer.
        "jamba": (
            "JambaConfig",
            "JambaForCausalLM",
            dict(
                intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                expert_layer_period=1,
                expert_layer_offset=0,
                attn_layer_period=2,
                attn_layer_offset=1,
                mamba_d_state=8,
            ),
        ),
        # Group-limited sigmoid routing in float32, squared-ReLU experts, shared experts; MoE layers
        # after an attention layer (Mamba layers left out: nothing MoE about them; transformers 5.25's
        # model fails when its first layer is a MoE one, as no released checkpoint's is).
        "nemotron_h": (
            "NemotronHConfig",
            "NemotronHForCausalLM",
            dict(
                layers_block_type=["full_attention", "moe", "moe"],
                head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                moe_shared_expert_intermediate_size=20,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_group=2,
                topk_group=1,
                routed_scaling_factor=2.0,
            ),
        ),
        # Aria's language model: transposed experts, shared experts; a gelu hidden_act that the
        # routed experts ignore (always SiLU-gated).
        "aria": (
            "AriaTextConfig",
            "AriaTextForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                moe_num_experts=6,
                moe_topk=2,
                moe_num_shared_experts=1,
                hidden_act="gelu",
            ),
        ),
        # DeepSeek-V3's router without shared experts; sliding-window and full attention layers.
        "mimo_v2_flash": (
            "MiMoV2FlashConfig",
            "MiMoV2FlashForCausalLM",
            dict(
                head_dim=8,
                v_head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                mlp_layer_types=["dense", "sparse"],
                layer_types=["full_attention", "sliding_attention"],
                sliding_window=8,
            ),
        ),
        # Sigmoid routing with an expert bias held by the block (a frozen parameter), shared experts.
        "afmoe": (
            "AfmoeConfig",
            "AfmoeForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                num_shared_experts=1,
                num_dense_layers=1,
                route_scale=1.5,
            ),
        ),
        # Float32 sigmoid routing with a block-held correction bias, shared experts, float32 combine.
        "hy_v3": (
            "HYV3Config",
            "HYV3ForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                router_scaling_factor=2.5,
                mlp_layer_types=["dense", "sparse"],
            ),
        ),
        # DeepSeek-V3's block and router with limited-SwiGLU experts (a tight limit, so the clamps bind).
        "hy_v4": ("HYV4Config", "HYV4ForCausalLM", dict(dsa, swiglu_limit=0.5)),
        # DeepSeek-V3's block with a router that masks other groups with 0 (group routing on here;
        # test_axk2_without_groups turns it off as the light checkpoints do).
        "axk2": ("AXK2Config", "AXK2ForCausalLM", dict(dsa)),
        # DeepSeek-V3's block with an RMSNorm on its output.
        "axk1": ("AXK1Config", "AXK1ForCausalLM", dict(dsv, mlp_layer_types=["dense", "sparse"])),
        # DeepSeek-V3's block with a router whose bias corrects the logits; sliding and full attention.
        "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM", kolibri),
        # Sigmoid routing with a correction bias and softcapped logits; the routed output scaled.
        "laguna": (
            "LagunaConfig",
            "LagunaForCausalLM",
            dict(
                moe8,
                **swa_full,
                intermediate_size=40,
                shared_expert_intermediate_size=20,
                moe_routed_scaling_factor=2.5,
                moe_router_logit_softcapping=2.0,
                mlp_layer_types=["dense", "sparse"],
            ),
        ),
        # Float32 softmax routing, an ungated shared expert; linear-attention layers.
        "lara_mini": (
            "LaraMiniConfig",
            "LaraMiniForCausalLM",
            dict(
                moe8,
                shared_expert_intermediate_size=20,
                norm_topk_prob=True,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                sliding_window=8,
            ),
        ),
        # Float32 sigmoid routing without bias, an ungated shared expert.
        "flint": (
            "FlintConfig",
            "FlintForCausalLM",
            dict(
                moe8,
                **swa_full,
                intermediate_size=40,
                shared_expert_intermediate_size=20,
                norm_topk_prob=True,
                mlp_only_layers=[0],
            ),
        ),
        # Softmax routing over routed and "zero" (identity) experts with a correction bias, scaled.
        "longcat_flash": (
            "LongcatFlashConfig",
            "LongcatFlashForCausalLM",
            dict(
                num_layers=2,
                ffn_hidden_size=40,
                expert_ffn_hidden_size=24,
                n_routed_experts=8,
                zero_expert_num=4,
                moe_topk=3,
                routed_scaling_factor=2.5,
                kv_lora_rank=16,
                q_lora_rank=12,
                qk_nope_head_dim=4,
                qk_rope_head_dim=4,
                v_head_dim=8,
                head_dim=4,
                num_key_value_heads=4,
            ),
        ),
        # Sigmoid routing over routed and shared experts; the shared experts weighted per token.
        "inkling": (
            "InklingTextConfig",
            "InklingForCausalLM",
            dict(
                head_dim=8,
                swa_num_attention_heads=4,
                swa_num_key_value_heads=2,
                swa_head_dim=8,
                sliding_window_size=8,
                intermediate_size=40,
                moe_intermediate_size=24,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_shared_experts=2,
                route_scale=2.5,
                mlp_layer_types=["dense", "sparse"],
            ),
        ),
        # Step-3.7's block and router; GPT-OSS's clamped SwiGLU on concatenated halves (a limit that binds).
        "minimax_m3_vl": (
            "MiniMaxM3VLTextConfig",
            "MiniMaxM3VLForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                dense_intermediate_size=40,
                shared_intermediate_size=20,
                num_local_experts=8,
                num_experts_per_tok=3,
                routed_scaling_factor=2.5,
                rotary_dim=4,
                swiglu_limit=0.5,
                mlp_layer_types=["dense", "sparse"],
                index_n_heads=2,
                index_head_dim=8,
                index_block_size=4,
                index_topk_blocks=2,
            ),
        ),
        # DeepSeek-V3's routing unscaled; the block scales the routed output; no shared experts.
        "beam": (
            "BeamConfig",
            "BeamForCausalLM",
            dict(
                moe8,
                **swa_full,
                intermediate_size=40,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                mlp_layer_types=["dense", "sparse"],
            ),
        ),
        # Float32 sigmoid routing with a correction bias; softcapped SwiGLU experts (caps that bind).
        "inkling2": (
            "Inkling2TextConfig",
            "Inkling2ForCausalLM",
            dict(
                head_dim=8,
                swa_num_attention_heads=4,
                swa_num_key_value_heads=2,
                swa_head_dim=8,
                sliding_window_size=8,
                unpadded_vocab_size=VOCAB,
                moe_intermediate_size=24,
                n_routed_experts=8,
                num_experts_per_tok=3,
                route_scale=2.5,
                mlp_gate_softcap=1.0,
                mlp_up_softcap=2.0,
                n_layers_per_attn_res_block=1,
                log_scaling_n_floor=16,
                d_rel=4,
                rel_extent=16,
            ),
        ),
        # Squared-ReLU experts [E, in, out] with a per-expert norm on each output; a shared expert.
        "ergo": (
            "ErgoConfig",
            "ErgoForCausalLM",
            dict(
                first_dense_intermediate_size=40,
                moe_intermediate_size=24,
                shared_intermediate_size=20,
                num_experts=8,
                num_experts_per_tok=3,
                moe_routed_scaling_factor=2.5,
                sliding_window=8,
            ),
        ),
        # Families whose block copies another's (hf_moe_opt.patches.derived).
        "minimax": (
            "MiniMaxConfig",
            "MiniMaxForCausalLM",
            dict(
                head_dim=8,
                intermediate_size=24,
                num_local_experts=6,
                num_experts_per_tok=2,
                layer_types=["linear_attention", "full_attention"],
                block_size=4,
            ),
        ),
        "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(gated_delta, norm_topk_prob=False)),
        "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", gated_delta),
        "flex_olmo": (
            "FlexOlmoConfig",
            "FlexOlmoForCausalLM",
            dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True),
        ),
        "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(v3, head_dim=8)),
        "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(v3, **mla)),
        "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(v3, head_dim=8, norm_topk_prob=False)),
        "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(v3, **mla)),
        "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", granite),
        "granitemoehybrid": (
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            dict(
                granite,
                layer_types=["mamba", "attention"],
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_d_state=8,
                mamba_n_groups=1,
                mamba_chunk_size=8,
            ),
        ),
        "exaone_moe": (
            "ExaoneMoeConfig",
            "ExaoneMoeForCausalLM",
            dict(
                v3,
                num_experts=8,
                num_shared_experts=1,
                head_dim=8,
                mlp_layer_types=["dense", "sparse"],
                layer_types=["full_attention", "full_attention"],
            ),
        ),
        "glm_moe_dsa": (
            "GlmMoeDsaConfig",
            "GlmMoeDsaForCausalLM",
            dict(dsv, index_topk=4, index_head_dim=8, index_n_heads=2),
        ),
        "kimi_linear": (
            "KimiLinearConfig",
            "KimiLinearForCausalLM",
            dict(
                dsv,
                num_local_experts=8,
                mlp_layer_types=["dense", "sparse"],
                layer_types=["linear_attention", "full_attention"],
                linear_head_dim=8,
                linear_num_heads=4,
            ),
        ),
        "bailing_hybrid": (
            "BailingHybridConfig",
            "BailingHybridForCausalLM",
            dict(
                dsv,
                num_local_experts=8,
                head_dim=8,
                mlp_layer_types=["dense", "sparse"],
                layer_types=["linear_attention", "full_attention"],
                swiglu_limits=[0.0, 0.3],  # from transformers 5.25: the limit after the activation binds
            ),
        ),
        "minicpm5_moe": (
            "MiniCPM5MoeConfig",
            "MiniCPM5MoeForCausalLM",
            dict(v3, head_dim=8, mlp_layer_types=["dense", "sparse"]),
        ),
        # Kolibri1's code under other names.
        "kolibri1_1": (
            "Kolibri1_1Config",
            "Kolibri1_1ForCausalLM",
            dict(
                kolibri,
                head_dim=16,  # its attention rounds keys and values to NVFP4 (blocks of 16)
                index_num_heads=2,
                index_topk=8,
                index_pool_size=16,
                index_compression=4,
                mlp_only_layers=[0],
                mlp_only_intermediate_size=40,
            ),
        ),
        "mellum": (
            "MellumConfig",
            "MellumForCausalLM",
            dict(head_dim=8, intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2),
        ),
        "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(v3, head_dim=8, routed_scaling_factor=1.0)),
        # Two expert modules beside the router (no experts child), a bias on the output; attention experts too.
        "jetmoe": (
            "JetMoeConfig",
            "JetMoeForCausalLM",
            dict(num_key_value_heads=4, kv_channels=8, intermediate_size=24, num_local_experts=8),
        ),
        # An MLP router with state carried across layers and a skip class; top-1.
        "zaya": (
            "ZayaConfig",
            "ZayaForCausalLM",
            dict(head_dim=8, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=1, router_hidden_size=16),
        ),
        # Hash routing by token id (layer 0), sqrt-softplus top-k with a correction bias (layer 1),
        # limited-SwiGLU experts (a limit that binds), a shared expert; hyper-connections around each block.
        "deepseek_v4": (
            "DeepseekV4Config",
            "DeepseekV4ForCausalLM",
            dict(
                num_key_value_heads=1,
                head_dim=16,
                q_lora_rank=16,
                moe_intermediate_size=24,
                n_routed_experts=8,
                num_experts_per_tok=2,
                o_groups=2,
                o_lora_rank=16,
                index_n_heads=2,
                index_head_dim=8,
                index_topk=4,
                sliding_window=8,
                hc_mult=2,
                mlp_layer_types=["hash_moe", "moe"],
                swiglu_limit=0.5,
            ),
        ),
    }


FAMILIES = list(_configs())

# Block class of each family, as ``supported_architectures`` must report it.
BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "deepseek_v2": "DeepseekV2Moe",
    "deepseek_v3": "DeepseekV3MoE",
    "gpt_oss": "GptOssMLP",
    "minimax_m2": "MiniMaxM2SparseMoeBlock",
    "ernie4_5_moe": "Ernie4_5_MoeSparseMoeBlock",
    "granitemoe": "GraniteMoeMoE",
    "hunyuan_v1_moe": "HunYuanMoEV1Moe",
    "mistral4": "Mistral4MoE",
    "lfm2_moe": "Lfm2MoeSparseMoeBlock",
    "llama4": "Llama4TextMoe",
    "phimoe": "PhimoeSparseMoeBlock",
    "cohere2_moe": "Cohere2MoeSparseMoeBlock",
    "jamba": "JambaSparseMoeBlock",
    "nemotron_h": "NemotronHMoE",
    "aria": "AriaTextMoELayer",
    "mimo_v2_flash": "MiMoV2FlashMoE",
    "afmoe": "AfmoeSparseMoeBlock",
    "hy_v3": "HYV3MoE",
    "hy_v4": "HYV4MoE",
    "axk2": "AXK2MoE",
    "kolibri1": "Kolibri1SparseMoeBlock",
    "laguna": "LagunaSparseMoeBlock",
    "lara_mini": "LaraMiniSparseMoeBlock",
    "flint": "FlintSparseMoeBlock",
    "longcat_flash": "LongcatFlashMoE",
    "inkling": "InklingMoE",
    "minimax_m3_vl": "MiniMaxM3VLSparseMoeBlock",
    "beam": "BeamMoE",
    "axk1": "AXK1MoE",
    "inkling2": "Inkling2SparseMoeBlock",
    "ergo": "ErgoMoE",
    "granitemoeshared": "GraniteMoeSharedMoE",
    "granitemoehybrid": "GraniteMoeHybridMoE",
    "minimax": "MiniMaxSparseMoeBlock",
    "qwen3_next": "Qwen3NextSparseMoeBlock",
    "qwen3_5_moe": "Qwen3_5MoeSparseMoeBlock",
    "flex_olmo": "FlexOlmoSparseMoeBlock",
    "glm4_moe": "Glm4MoeMoE",
    "glm4_moe_lite": "Glm4MoeLiteMoE",
    "dots1": "Dots1MoE",
    "deepseek_v32": "DeepseekV32MoE",
    "solar_open": "SolarOpenMoE",
    "exaone_moe": "ExaoneMoeSparseMoEBlock",
    "glm_moe_dsa": "GlmMoeDsaMoE",
    "kimi_linear": "KimiLinearMoE",
    "bailing_hybrid": "BailingHybridMoE",
    "minicpm5_moe": "MiniCPM5MoeMoE",
    "kolibri1_1": "Kolibri1_1SparseMoeBlock",
    "mellum": "MellumSparseMoeBlock",
    "deepseek_v4": "DeepseekV4SparseMoeBlock",
    "zaya": "ZayaSparseMoeBlock",
    "jetmoe": "JetMoeMoE",
}

# How each family routes: its own name, or the family whose router it copies ("renormalized": softmax
# top-k always renormalised, weights in the logits' dtype).
ROUTES = {
    "minimax": "mixtral",
    "qwen3_next": "qwen2_moe",
    "qwen3_5_moe": "renormalized",
    "flex_olmo": "olmoe",
    "granitemoeshared": "granitemoe",
    "granitemoehybrid": "granitemoe",
    "mellum": "qwen3_moe",
    "kolibri1_1": "kolibri1",
    **dict.fromkeys(
        ["glm4_moe", "glm4_moe_lite", "dots1", "deepseek_v32", "solar_open", "exaone_moe", "glm_moe_dsa"]
        + ["kimi_linear", "bailing_hybrid", "nemotron_h", "mimo_v2_flash", "hy_v4", "minicpm5_moe", "axk1"],
        "deepseek_v3",
    ),
}


def _blocks(model: nn.Module, family: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == BLOCKS[family]]


def _router_of(block: nn.Module) -> nn.Module:
    return block.router if "router" in dict(block.named_children()) else block.gate


def tiny_model(
    family: str, seed: int = 0, experts_implementation: str | None = None, *, refused: bool = False, **overrides
) -> nn.Module:
    """A tiny random causal LM of ``family`` in eval mode (fp32). Skips the test where the installed
    transformers changed a copied family's code as :data:`KNOWN_DRIFT` records (``optimize`` refuses it
    there), unless ``refused``."""
    if not refused:
        _skip_known_drift(family)
    config_name, model_name, kwargs = _configs()[family]
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    if family in ("jamba", "aria"):
        from hf_moe_opt.patches import aria, jamba

        if (jamba.OptimizedJambaRouter if family == "jamba" else aria.OptimizedAriaRouter) is None:
            pytest.skip(f"transformers {transformers.__version__}'s {family} routes inside its block (not matched)")
    if family == "longcat_flash":
        from hf_moe_opt.patches import longcat_flash

        if longcat_flash.OptimizedLongcatFlashRouter is None:
            pytest.skip(f"transformers {transformers.__version__}'s experts handle the zero experts (not matched)")
    config = config_cls(**{**_COMMON, **kwargs, **overrides})
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    _spread(model)
    return model


@torch.no_grad()
def _spread(model: nn.Module) -> None:
    # Random init gives near-uniform routers and tiny expert outputs; scale both up so routing is
    # decisive and the experts move the logits. Nonzero biases and correction biases are exercised.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        # Granite's block is block_sparse_moe, Llama 4's feed_forward, Nemotron-H's mixer.
        moe = any(part in name for part in (".mlp.", ".block_sparse_moe.", ".feed_forward.", ".mixer."))
        if moe and (".gate.weight" in name or ".router." in name) and "shared" not in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        elif moe and ".experts." in name:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 0.2))
        elif moe and (".input_linear." in name or ".output_linear." in name):  # JetMoE's MLP experts
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif moe and name.endswith("mlp.bias"):  # JetMoE's output bias
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name.endswith("gate.wg.weight"):  # Hunyuan's router holds a float32 linear
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        elif name.endswith(("e_score_correction_bias", "expert_bias")):  # ERNIE 4.5's router, AFMoE's block
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif moe and name.endswith(".gate.linear.weight"):  # Ergo's router holds a float32-output linear
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        elif name.endswith("post_expert_norm.weight"):  # Ergo's per-expert norms
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
        elif name.endswith("router_mlp.out_proj.weight"):  # ZAYA's MLP router
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        elif name.endswith("gate.global_scale"):  # Inkling's router
            p.fill_(1.3)
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):  # on the router or the block
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("tid2eid"):  # DeepSeek-V4's hash table: k distinct experts per token id
            b.copy_(torch.rand(b.shape[0], model.config.n_routed_experts, generator=g).topk(b.shape[1]).indices)


def _ids(batch: int = 3, seq: int = 9, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _records_router_logits(model: nn.Module) -> bool:
    # transformers 5.17 records no router logits for DeepSeek-V2/V3 (no recorder, no output field).
    return "router_logits" in (getattr(model, "_can_record_outputs", None) or {}) or "router_logits" in (
        getattr(model.model, "_can_record_outputs", None) or {}
    )


# Copied families whose code a later transformers changed (patches.derived refuses them there), with
# the class that changed. None at present: Bailing hybrid's experts, changed in 5.25, now match
# Step-3.7's (tests/test_act_limited_experts.py).
KNOWN_DRIFT: dict[str, str] = {}


def refused_copy(family: str) -> str | None:
    """Why the installed transformers' code of a copied family is refused, or None (matched, or not a copy)."""
    from hf_moe_opt.patches.derived import derived_patches

    return next((p.mismatch() for p in derived_patches() if p.model_type == family), None)


def _skip_known_drift(family: str) -> None:
    reason = refused_copy(family) if family in KNOWN_DRIFT else None
    if reason is not None:
        pytest.skip(f"transformers {transformers.__version__} refuses {family} ({reason}): test_known_drift_is_refused")


def _keep_float32(model: nn.Module) -> None:
    """What ``from_pretrained`` does for a 16-bit model: the tensors its class names in
    ``_keep_in_fp32_modules_strict`` (Inkling 2's router weight, ...) stay float32."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if any(k in name for k in keep) and t.is_floating_point():
                t.data = t.data.float()


def _pair(family: str, dtype: torch.dtype = torch.float32, capacity: str = "model", **kw):
    ref = tiny_model(family, **kw).to(dtype)
    _keep_float32(ref)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, capacity=capacity, backend="torch")
    return ref, opt


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fp32_matches_transformers(family):
    ref, opt = _pair(family)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    expected = len(_blocks(ref, family))  # the DeepSeek-V3-style configs make the first layer dense
    assert expected >= 1
    layers = hf_moe_opt.optimized_layers(opt)
    assert len(layers) == expected
    assert all(layer.family == family for _, layer in layers)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    record = _records_router_logits(ref)
    with torch.no_grad():
        r = ref(ids, attention_mask=mask, output_router_logits=record)
        o = opt(ids, attention_mask=mask, output_router_logits=record)
    torch.testing.assert_close(o.logits, r.logits, **FP32)
    if record and getattr(r, "router_logits", None) is not None:  # 5.17: not every output class has them
        # DeepSeek-V4 records its learned routers' logits, not its hash routers'; JetMoE its attention
        # experts' routers' too (same class; once or twice per layer, by transformers version).
        recorded = expected - (family == "deepseek_v4")
        if family == "jetmoe":
            assert len(r.router_logits) > recorded
            recorded = len(r.router_logits)
        assert len(o.router_logits) == len(r.router_logits) == recorded
        for a, b in zip(r.router_logits, o.router_logits, strict=True):
            torch.testing.assert_close(b, a, **FP32)
    # The state dict is unchanged: same keys in the same order, same values, same dtypes, and the
    # fused expert parameters are the very same tensors (no copies).
    opt_state = opt.state_dict()
    assert list(opt_state) == list(state)
    for key, value in state.items():
        assert opt_state[key].dtype == value.dtype
        torch.testing.assert_close(opt_state[key], value, atol=0, rtol=0)
    for name, p in opt.named_parameters():
        if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")):  # not shared experts
            layer = dict(layers)[name.rsplit(".experts.", 1)[0]]
            fused = layer.weights.w1 if name.endswith("gate_up_proj") else layer.weights.w2
            assert fused.param is p and fused.tensor.data_ptr() == p.data_ptr()
    # Greedy generation gives the reference tokens.
    prompt = _ids(batch=2, seq=5, seed=3)
    with torch.no_grad():
        g_ref = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        g_opt = opt.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(g_opt, g_ref)
    # Restore: the original blocks and router classes back, same parameters.
    hf_moe_opt.restore(opt)
    assert not hf_moe_opt.is_optimized(opt)
    assert len(_blocks(opt, family)) == expected
    router = _router_of(_blocks(opt, family)[-1])
    assert not type(router).__name__.startswith("Optimized")
    with torch.no_grad():
        torch.testing.assert_close(opt(ids, attention_mask=mask).logits, r.logits, **FP32)


@pytest.mark.parametrize(
    "family",
    [
        *("mixtral", "deepseek_v3", "gpt_oss", "minimax_m2", "ernie4_5_moe", "granitemoehybrid", "lfm2_moe"),
        *("minimax", "qwen3_5_moe", "glm4_moe", "mistral4", "llama4", "phimoe", "cohere2_moe", "jamba"),
        *("nemotron_h", "aria", "mimo_v2_flash", "afmoe", "hy_v3", "hy_v4", "axk2", "kolibri1"),
        *(
            "bailing_hybrid",
            "minicpm5_moe",
            "laguna",
            "lara_mini",
            "flint",
            "longcat_flash",
            "inkling",
            "minimax_m3_vl",
            "beam",
            "axk1",
            "inkling2",
            "ergo",
            "deepseek_v4",
            "zaya",
            "jetmoe",
        ),
    ],
)
def test_family_bf16_matches_transformers(family):
    ref, opt = _pair(family, torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        try:
            r = ref(ids).logits.float()
        except RuntimeError as e:  # transformers 5.17's DeepSeek-V4 mixes float32 and bf16 in a linear
            if family != "deepseek_v4":
                raise
            pytest.skip(f"transformers {transformers.__version__}'s own DeepSeek-V4 fails in bf16: {e}")
        o = opt(ids).logits.float()
    torch.testing.assert_close(o, r, **BF16)
    assert (o.argmax(-1) == r.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_capacity_none_equals_model(family):
    # These families have no capacity: both modes route every assignment.
    model = tiny_model(family)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    hf_moe_opt.optimize(a, capacity="model", backend="torch")
    hf_moe_opt.optimize(b, capacity="none", backend="torch")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family", sorted(KNOWN_DRIFT))
def test_known_drift_is_refused(family):
    """Where the installed transformers changed a copied family's code, optimize refuses its blocks and
    names the changed class instead of running the copied family's computation."""
    reason = refused_copy(family)
    if reason is None:
        pytest.skip(f"transformers {transformers.__version__}'s {family} still matches the family it copies")
    assert KNOWN_DRIFT[family] in reason
    with pytest.raises(ValueError, match=f"{KNOWN_DRIFT[family]} code differs"):
        hf_moe_opt.optimize(tiny_model(family, refused=True))


def test_supported_architectures_lists_families():
    supported = hf_moe_opt.supported_architectures()
    for family, block in BLOCKS.items():
        assert supported[family] == block


def test_block_tensors_follow_the_layer_and_come_back_on_restore():
    # MiniMax-M2 keeps its correction bias on the block: the layer holds it under the same name, a
    # cast while optimized reaches it, and restore hands the cast tensor back to the block.
    ref, opt = _pair("minimax_m2")
    ref.to(torch.bfloat16)
    opt.to(torch.bfloat16)
    layer = dict(hf_moe_opt.optimized_layers(opt))["model.layers.1.mlp"]
    assert layer.e_score_correction_bias.dtype == torch.bfloat16
    hf_moe_opt.restore(opt)
    block = opt.model.layers[1].mlp
    assert block.e_score_correction_bias is layer.e_score_correction_bias
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(expert_selection_fn="sigmoid", norm_topk_prob=True, shared_expert_combination_strategy="sum"),
        dict(expert_selection_fn="sigmoid", norm_topk_prob=False, num_shared_experts=0),
        dict(expert_selection_fn="softmax", num_shared_experts=2, shared_expert_combination_strategy="sum"),
    ],
)
def test_cohere2_moe_router_and_shared_expert_options(overrides):
    """Cohere2-MoE's sigmoid routing (renormalised or not) and each way of combining shared experts."""
    if getattr(transformers, "Cohere2MoeConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Cohere2-MoE")
    ref, opt = _pair("cohere2_moe", **overrides)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)
        x = torch.randn(11, 32) * 2
        want = _router_of(_blocks(ref, "cohere2_moe")[-1])(x)
        got = hf_moe_opt.optimized_layers(opt)[-1][1].router(x)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nemotron_h_latent_projection(dtype):
    """With ``moe_latent_size`` the experts run on the projected tokens while the router sees the hidden
    states; the block as transformers' (fp32 and bf16), and in fp32 the whole model and its tokens."""
    if getattr(transformers, "NemotronHConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Nemotron-H")
    ref, opt = _pair("nemotron_h", dtype, moe_latent_size=16)
    layer = hf_moe_opt.optimized_layers(opt)[0][1]
    assert layer.weights.w1.tensor.shape == (8, 24, 16) and layer.activation.name == "relu2"
    x = torch.randn(2, 5, 32).to(dtype)
    tol = FP32 if dtype == torch.float32 else BF16
    with torch.no_grad():
        torch.testing.assert_close(opt.model.layers[1].mixer(x), ref.model.layers[1].mixer(x), **tol)
        if dtype == torch.float32:
            ids = _ids()
            torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)
            prompt = _ids(batch=2, seq=5, seed=3)
            g_ref = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(opt.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), g_ref)


def test_aria_experts_are_silu_gated_whatever_hidden_act_says():
    """Aria's routed experts build their SiLU themselves (the config's gelu is the shared experts'): the
    kernels must take SiLU, named so, not the config's activation."""
    _, opt = _pair("aria")
    assert [layer.activation.name for _, layer in hf_moe_opt.optimized_layers(opt)] == ["glu_silu"] * 2
    assert opt.config.hidden_act == "gelu"


def test_hy_v3_combine_in_the_model_dtype():
    """HY-V3 with ``enable_moe_fp32_combine=False``: routed and shared outputs added in the model dtype."""
    if getattr(transformers, "HYV3Config", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no HY-V3")
    for dtype, tol in ((torch.float32, FP32), (torch.bfloat16, dict(atol=3e-2, rtol=3e-2))):
        ref, opt = _pair("hy_v3", dtype, enable_moe_fp32_combine=False)
        x = torch.randn(2, 5, 32).to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(opt.model.layers[1].mlp(x), ref.model.layers[1].mlp(x), **tol)


def test_axk2_without_groups():
    """AXK2's light checkpoints route without groups (``n_group=None``): every expert competes."""
    if getattr(transformers, "AXK2Config", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no AXK2")
    ref, opt = _pair("axk2", n_group=None, topk_group=None)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)


def test_ernie_block_without_shared_experts():
    ref, opt = _pair("ernie4_5_moe", moe_num_shared_experts=0)
    assert ref.model.layers[-1].mlp.shared_experts is None
    assert "shared_experts" not in dict(opt.model.layers[-1].mlp.named_children())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_family_cuda_triton_matches_transformers(family):
    """Every family through the Triton kernels on a GPU, fp32, against transformers on the GPU."""
    from hf_moe_opt.experts.backends import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available")
    ref = tiny_model(family).cuda()
    ref.set_attn_implementation("eager")  # cuDNN's SDPA faults on the tiny MLA head sizes
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="triton")
    ids = _ids().cuda()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, atol=2e-4, rtol=2e-4)
    device = ids.device
    assert all(layer._backend_name(device) == "triton" for _, layer in hf_moe_opt.optimized_layers(opt))


@pytest.mark.parametrize("family", ["granitemoe", "granitemoehybrid"])
def test_granite_router_keeps_the_installed_output_order(family):
    # The order of the router's outputs changed between transformers versions; anything reading them
    # (the block, transformers' router-logit recorder) gets the installed version's order.
    ref, opt = _pair(family)
    x = torch.randn(12, 32)
    with torch.no_grad():
        want = _router_of(_blocks(ref, family)[-1])(x)
        got = hf_moe_opt.optimized_layers(opt)[-1][1].router(x)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_lfm2_block_without_expert_bias():
    ref, opt = _pair("lfm2_moe", use_expert_bias=False, norm_topk_prob=False)
    assert not any(name.endswith("expert_bias") for name, _ in ref.named_buffers())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)


def test_gpt_oss_block_returns_router_scores():
    ref, opt = _pair("gpt_oss")
    block_ref, block_opt = ref.model.layers[0].mlp, opt.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h_ref, s_ref = block_ref(x)
        h_opt, s_opt = block_opt(x)
    torch.testing.assert_close(h_opt, h_ref, **FP32)
    torch.testing.assert_close(s_opt, s_ref, **FP32)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_block_takes_flat_tokens_as_transformers_does(family):
    """DeepSeek's blocks accept ``[tokens, hidden]`` as well as ``[batch, seq, hidden]``; so does the
    optimized block (same output shape and values), and other ranks get a clear error."""
    ref, opt = _pair(family)
    block_ref, block_opt = ref.model.layers[-1].mlp, opt.model.layers[-1].mlp
    x = torch.randn(7, 32)
    with torch.no_grad():
        out = block_opt(x)
        torch.testing.assert_close(out, block_ref(x), **FP32)
        assert out.shape == (7, 32)
        torch.testing.assert_close(block_opt(x.view(1, 7, 32)), out.view(1, 7, 32), **FP32)
        with pytest.raises(ValueError, match="batch, seq, hidden"):
            block_opt(x.view(1, 1, 7, 32))


def test_deepseek_v2_greedy_and_v3_without_norm():
    for family, overrides in (("deepseek_v2", dict(topk_method="greedy")), ("deepseek_v3", dict(norm_topk_prob=False))):
        ref, opt = _pair(family, **overrides)
        ids = _ids()
        with torch.no_grad():
            torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)


def test_fused_moe_raises_in_training_mode():
    _, opt = _pair("qwen3_moe")
    opt.train()
    with pytest.raises(RuntimeError, match="inference only"):
        opt(_ids())


def _triton_runs_here() -> bool:
    from hf_moe_opt.experts.backends import available_backends

    if "triton" not in available_backends():
        return False
    from hf_moe_opt.kernels import kernels_interpreted

    return torch.cuda.is_available() or kernels_interpreted()


def test_composite_model_experts_activation():
    # A VLM around a Mixtral text model: the top-level config has no hidden_act (it is in text_config).
    # The Triton kernels choose the activation by its name, so the name must be the experts' own.
    if getattr(transformers, "LlavaConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Llava")
    text = transformers.MixtralConfig(**{**_COMMON, **_configs()["mixtral"][2], "hidden_act": "gelu"})
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels run where CUDA is
    ref = transformers.LlavaForConditionalGeneration(config).eval()
    assert getattr(ref.config, "hidden_act", None) is None
    _spread(ref)
    ref.to(device)
    ids = _ids().to(device)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    for backend in ["torch", "triton"] if _triton_runs_here() else ["torch"]:
        opt = copy.deepcopy(ref)
        hf_moe_opt.optimize(opt, backend=backend)
        layers = hf_moe_opt.optimized_layers(opt)
        assert len(layers) == 2 and all(layer.activation.name == "glu_gelu" for _, layer in layers)
        with torch.no_grad():
            torch.testing.assert_close(opt(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


# --- routing functions against the transformers routers, on random logits -------------------------


def _hf_router(family: str, **overrides) -> nn.Module:
    model = tiny_model(family, **overrides)
    return _router_of(_blocks(model, family)[-1])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("mistral4", "llama4", "jetmoe")])  # own tests
def test_routing_functions_match_transformers_routers(family):
    router = _hf_router(family)
    x = torch.randn(40, 32) * 2
    bias = torch.randn(getattr(router, "num_experts", 8)) * 0.1  # MiniMax-M2's block passes its correction bias
    family = ROUTES.get(family, family)
    with torch.no_grad():
        if family == "afmoe":  # its router takes [B, S, D] tokens
            out = router(x.view(4, 10, 32), bias)
        elif family == "zaya":  # [B, S, D] tokens too; no state from a previous layer here
            out = router(x.view(4, 10, 32))
        elif family in ("minimax_m2", "lfm2_moe", "hy_v3"):
            out = router(x, bias)
        else:
            out = router(x)
        if family == "granitemoe":  # transformers 5.17 returns (indices, weights, logits)
            from hf_moe_opt.patches.granitemoe import output_order

            out = [out[at] for at in output_order(type(router))]
        logits, weights, indices = out[:3]  # Inkling's router returns its shared experts' gammas too
        if family == "lfm2_moe":
            i = torch.topk(logits.sigmoid() + bias, router.top_k).indices
            w = logits.sigmoid().gather(1, i)
            w = w / (w.sum(-1, keepdim=True) + 1e-6) * router.routed_scaling_factor
        elif family == "phimoe":  # transformers' own SparseMixer, at inference
            from transformers.models.phimoe.modeling_phimoe import sparsemixer

            w, i = sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False)
        elif family in ("afmoe", "hy_v3"):
            i = torch.topk(logits.sigmoid() + bias, router.top_k, dim=1).indices
            w = logits.sigmoid().gather(1, i)
            scale = router.route_scale if family == "afmoe" else router.router_scaling_factor
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * scale
        elif family == "jamba":  # never renormalised
            w, i = softmax_topk(logits, router.top_k, normalize=False, weights_dtype=logits.dtype)
        elif family == "cohere2_moe":
            top, i = torch.topk(logits, router.top_k, dim=-1)
            if router.expert_selection_fn == "softmax":
                w = torch.softmax(top.float(), dim=-1).to(x.dtype)
            else:
                w = torch.sigmoid(top)
                w = (w / w.sum(-1, keepdim=True) if router.norm_topk_prob else w).to(x.dtype)
        elif family == "hunyuan_v1_moe":
            w, i = softmax_topk(logits, router.top_k, normalize=True, weights_dtype=logits.dtype)
        elif family == "ernie4_5_moe":
            probs = logits.softmax(-1)
            i = torch.topk(probs + router.moe_statics.e_score_correction_bias, router.top_k).indices
            w = probs.gather(-1, i)
            w = w / w.sum(-1, keepdim=True)
        elif family == "minimax_m2":
            w, i = deepseek_topk(
                logits.float(), router.top_k, scoring="sigmoid", method="greedy", correction_bias=bias, normalize=True
            )
        elif family == "laguna":  # logits already softcapped; bias for the choice; weights in x's dtype
            scores = logits.sigmoid()
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        elif family == "inkling":  # sigmoids of the k chosen and the shared logits over their sum, scaled
            shared_logits = F.linear(x, router.weight)[:, -router.n_shared_experts :]
            i = torch.topk(logits.sigmoid() + router.e_score_correction_bias, router.top_k, dim=-1).indices
            s = torch.cat([logits.gather(1, i), shared_logits], dim=-1).sigmoid()
            s = s / s.sum(-1, keepdim=True) * router.route_scale * router.global_scale
            torch.testing.assert_close(out[3], s[:, router.top_k :], atol=1e-6, rtol=1e-6)
            assert torch.equal(i.sort(-1).values, indices.sort(-1).values)
            order_ref, order = indices.argsort(-1), i.argsort(-1)
            w = s[:, : router.top_k]
            torch.testing.assert_close(w.gather(-1, order), weights.gather(-1, order_ref), atol=1e-6, rtol=1e-6)
            return
        elif family == "ergo":  # sigmoid, bias for the choice, renormalised, scaled; in x's dtype, then float32
            scores = logits.sigmoid()
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = (w / (w.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor).to(x.dtype).float()
        elif family == "zaya":  # top-k of softmax plus balancing biases over experts and a skip class
            probs = logits.softmax(-1)
            i = torch.topk(probs + router.balancing_biases, router.top_k, dim=-1).indices
            w = probs.gather(1, i)
            skip = i == router.num_experts
            w, i = w.masked_fill(skip, 0), i.masked_fill(skip, 0)
        elif family == "deepseek_v4":  # sqrt-softplus scores in x's dtype, bias for the choice, renormalised
            scores = F.softplus(logits).sqrt()
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
        elif family == "inkling2":  # float32 sigmoid scores, bias for the choice, renormalised, scaled
            scores = logits.sigmoid()
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
        elif family == "beam":  # DeepSeek-V3's routing, the scaling left to the block
            w, i = deepseek_topk(
                logits,
                router.top_k,
                scoring="sigmoid",
                method="noaux_tc",
                n_group=router.num_group,
                topk_group=router.topk_group,
                correction_bias=router.e_score_correction_bias,
                normalize=router.norm_topk_prob,
            )
        elif family == "minimax_m3_vl":  # Step-3.7's routing: sigmoid, bias for the choice, renormalised
            scores = logits.float().sigmoid()
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = w / w.sum(-1, keepdim=True)
        elif family == "longcat_flash":  # over routed and zero experts; not renormalised, scaled
            scores = logits.softmax(-1)
            i = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = scores.gather(1, i) * router.routed_scaling_factor
        elif family == "flint":  # sigmoid top-k, no bias, float32 weights
            w, i = torch.topk(logits.sigmoid(), router.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True) if router.norm_topk_prob else w
        elif family == "kolibri1":  # the bias corrects the logits; sigmoid of the chosen logits
            i = torch.topk(logits + router.e_score_correction_bias, router.top_k, dim=-1).indices
            w = logits.gather(1, i).sigmoid()
            w = w / w.sum(-1, keepdim=True) if router.norm_topk_prob else w
        elif family == "axk2":  # V3's routing, but other groups' experts masked to 0
            scores = logits.sigmoid()
            choice = scores + router.e_score_correction_bias
            if router.num_group is not None:
                groups = choice.view(-1, router.num_group, 8 // router.num_group).topk(2, dim=-1)[0].sum(-1)
                kept = torch.zeros_like(groups).scatter_(1, groups.topk(router.topk_group, dim=-1)[1], 1)
                choice = choice.masked_fill(~kept.repeat_interleave(8 // router.num_group, dim=1).bool(), 0.0)
            i = torch.topk(choice, router.top_k, dim=-1).indices
            w = scores.gather(1, i)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
        elif family in ("deepseek_v2", "deepseek_v3"):
            method = router.topk_method if family == "deepseek_v2" else "noaux_tc"
            w, i = deepseek_topk(
                logits,
                router.top_k,
                scoring="softmax" if family == "deepseek_v2" else "sigmoid",
                method=method,
                n_group=router.num_group,
                topk_group=router.topk_group,
                correction_bias=getattr(router, "e_score_correction_bias", None),
                normalize=family == "deepseek_v3" and router.norm_topk_prob,
                scaling=router.routed_scaling_factor,
            )
        elif family in ("gpt_oss", "granitemoe", "aria"):
            w, i = topk_softmax(logits, router.top_k)
        elif family == "mixtral":
            w, i = softmax_topk(logits, router.top_k, normalize=True)
        elif family == "renormalized":
            w, i = softmax_topk(logits, router.top_k, normalize=True, weights_dtype=logits.dtype)
        else:
            w, i = softmax_topk(logits, router.top_k, normalize=router.norm_topk_prob, weights_dtype=logits.dtype)
    assert torch.equal(i.sort(-1).values, indices.sort(-1).values)
    order_ref, order = indices.argsort(-1), i.argsort(-1)
    torch.testing.assert_close(w.gather(-1, order), weights.gather(-1, order_ref), atol=0, rtol=0)
    assert w.dtype == weights.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_mistral_routers_match_transformers(large, dtype):
    """Mistral 4 (model-dtype softmax, optional renormalisation) and Mistral Large 3 (float32, always
    renormalised): the optimized router's outputs equal transformers' on the same router."""
    from hf_moe_opt.patches.base import swap_router_class
    from hf_moe_opt.patches.mistral4 import OptimizedMistral4Router, OptimizedMistralLarge4Router

    if large:
        if getattr(transformers, "MistralLarge4TextConfig", None) is None:
            pytest.skip(f"transformers {transformers.__version__} has no Mistral Large 3")
        from transformers.models.mistral_large4.modeling_mistral_large4 import MistralLarge4TextTopkRouter as Router

        optimized = OptimizedMistralLarge4Router
        config = transformers.MistralLarge4TextConfig(**{**_COMMON, **_configs()["deepseek_v3"][2], "head_dim": 8})
    else:
        if getattr(transformers, "Mistral4Config", None) is None:
            pytest.skip(f"transformers {transformers.__version__} has no Mistral 4")
        from transformers.models.mistral4.modeling_mistral4 import Mistral4TopkRouter as Router

        optimized = OptimizedMistral4Router
        config = transformers.Mistral4Config(**{**_COMMON, **_configs()["mistral4"][2]})
    torch.manual_seed(0)
    hf = Router(config).to(dtype)
    with torch.no_grad():
        hf.weight.normal_(0, 0.7)
    ours = copy.deepcopy(hf)
    swap_router_class(ours, optimized)
    x = (torch.randn(50, 32) * 2).to(dtype)
    with torch.no_grad():
        want, got = hf(x), ours(x)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_mistral_large_3_text_model_matches_transformers():
    if getattr(transformers, "MistralLarge4TextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Mistral Large 3")
    extra = dict(index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=8)
    config = transformers.MistralLarge4TextConfig(**{**_COMMON, **_configs()["deepseek_v3"][2], **extra})
    torch.manual_seed(0)
    ref = transformers.MistralLarge4TextModel(config).eval()
    _spread(ref)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    assert [layer.family for _, layer in hf_moe_opt.optimized_layers(opt)] == ["mistral_large4"]
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        torch.testing.assert_close(opt(ids).last_hidden_state, expected, atol=2e-5, rtol=2e-5)
        hf_moe_opt.restore(opt)
        torch.testing.assert_close(opt(ids).last_hidden_state, expected, atol=0, rtol=0)


def _llama4_or_skip():
    if getattr(transformers, "Llama4TextConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Llama 4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_router_matches_transformers(dtype):
    """Called as transformers calls it, the optimized router returns transformers' ``(scores [N, E],
    logits)`` exactly; with ``return_topk`` its weights and experts are those scores' nonzero entries."""
    from hf_moe_opt.patches.base import swap_router_class
    from hf_moe_opt.patches.llama4 import OptimizedLlama4Router

    _llama4_or_skip()
    router = _hf_router("llama4").to(dtype)
    x = (torch.randn(40, 32) * 2).to(dtype)
    with torch.no_grad():
        scores, logits = router(x)
        swap_router_class(router, OptimizedLlama4Router)
        got_scores, got_logits = router(x)
        weights, logits_k, indices = router(x, return_topk=True)
    for a, b in ((got_scores, scores), (got_logits, logits), (logits_k, logits)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert weights.dtype == dtype and indices.shape == (40, router.top_k)
    torch.testing.assert_close(scores.gather(1, indices), weights, atol=0, rtol=0)
    rest = torch.ones_like(scores, dtype=torch.bool).scatter_(1, indices, False)
    assert (scores[rest] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_top1_interleaved(dtype):
    """The released configurations: top-1 (one scaled copy per token, no sum) with MoE blocks on every
    other layer (Maverick's interleaving); logits, greedy tokens and the block's outputs as transformers."""
    _llama4_or_skip()
    ref, opt = _pair("llama4", dtype, num_experts_per_tok=1, interleave_moe_layer_step=2, num_hidden_layers=4)
    names = [name for name, _ in hf_moe_opt.optimized_layers(opt)]
    assert names == ["model.layers.1.feed_forward", "model.layers.3.feed_forward"]
    ids = _ids()
    tol = FP32 if dtype == torch.float32 else BF16
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits.float(), ref(ids).logits.float(), **tol)
        x = torch.randn(2, 5, 32).to(dtype)
        h_ref, logits_ref = ref.model.layers[1].feed_forward(x)
        h_opt, logits_opt = opt.model.layers[1].feed_forward(x)
    assert h_opt.shape == h_ref.shape == (10, 32)  # flattened tokens, as transformers returns them
    torch.testing.assert_close(h_opt.float(), h_ref.float(), **tol)
    torch.testing.assert_close(logits_opt, logits_ref, atol=0, rtol=0)
    prompt = _ids(batch=2, seq=5, seed=3)
    with torch.no_grad():
        g_ref = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        g_opt = opt.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if dtype == torch.float32:
        assert torch.equal(g_opt, g_ref)
    else:  # bf16: a near-tie may flip a late token; most must agree
        assert (g_opt == g_ref).float().mean() > 0.9


def test_nemotron_h_triton_backend_matches_transformers():
    """Squared-ReLU experts on a latent projection through the Triton kernels (on CPU in the
    interpreter): prefill and one-token decode steps (the GEMV path), against transformers."""
    if getattr(transformers, "NemotronHConfig", None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no Nemotron-H")
    if not _triton_runs_here():
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = tiny_model("nemotron_h", moe_latent_size=16).to(device)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="triton")
    prompt = _ids(batch=1, seq=4, seed=5).to(device)
    with torch.no_grad():
        torch.testing.assert_close(opt(prompt).logits, ref(prompt).logits, atol=2e-4, rtol=2e-4)
        g_ref = ref.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(opt.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0), g_ref)
    assert all(layer._backend_name(torch.device(device)) == "triton" for _, layer in hf_moe_opt.optimized_layers(opt))


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_triton_backend_matches_transformers(top_k):
    """The scaled copies through the Triton kernels (on CPU in the interpreter): prefill and
    one-token decode steps (the GEMV path), against transformers."""
    _llama4_or_skip()
    if not _triton_runs_here():
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = tiny_model("llama4", num_experts_per_tok=top_k).to(device)
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="triton")
    assert all(layer._backend_name(torch.device(device)) == "triton" for _, layer in hf_moe_opt.optimized_layers(opt))
    prompt = _ids(batch=1, seq=4, seed=5).to(device)
    with torch.no_grad():
        torch.testing.assert_close(opt(prompt).logits, ref(prompt).logits, atol=2e-4, rtol=2e-4)
        g_ref = ref.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        g_opt = opt.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(g_opt, g_ref)


def test_llama4_scales_inputs_not_outputs():
    """The score multiplies each expert's input: with the activation nonlinear this differs from
    scaling the output, so a layer that scaled outputs (as every other family) would fail here."""
    _llama4_or_skip()
    ref, opt = _pair("llama4")
    block_ref, block_opt = ref.model.layers[0].feed_forward, opt.model.layers[0].feed_forward
    x = torch.randn(7, 32)
    with torch.no_grad():
        h_ref, _ = block_ref(x)
        weights, _, indices = block_opt.router(x, return_topk=True)
        shared = block_ref.shared_expert(x)
        w1, w2 = block_ref.experts.gate_up_proj, block_ref.experts.down_proj
        by_output = shared.clone()
        for t in range(7):
            for j in range(indices.shape[1]):
                e = int(indices[t, j])
                gate, up = (x[t] @ w1[e]).chunk(2)
                by_output[t] += weights[t, j] * ((up * F.silu(gate)) @ w2[e])
        h_opt, _ = block_opt(x)
    torch.testing.assert_close(h_opt, h_ref, **FP32)
    assert (h_opt - by_output).abs().max() > 1e-3


def test_deepseek_group_limit_restricts_choice():
    logits = torch.randn(64, 12)
    _, indices = deepseek_topk(logits, 3, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=1)
    groups = indices // 3
    assert bool((groups == groups[:, :1]).all())  # one group allowed: all picks from it


# --- GLU experts in the torch backend -----------------------------------------------------------


def _loop_reference(x, idx, gates, w1, b1, w2, b2, act):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[n, s])
            h = x[n] @ w1[e].T + (0 if b1 is None else b1[e])
            y = act.apply(h[None])[0] @ w2[e].T + (0 if b2 is None else b2[e])
            out[n] += gates[n, s] * y
    return out


@pytest.mark.parametrize("variant", ["concatenated", "interleaved", "clamped_swiglu"])
def test_glu_backend_matches_loop(variant):
    from hf_moe_opt.dispatch import make_plan
    from hf_moe_opt.experts.torch_backend import torch_moe_ffn

    torch.manual_seed(0)
    E, D, F_, N, k = 5, 16, 12, 23, 2
    if variant == "clamped_swiglu":
        act = clamped_swiglu_activation(1.702, 0.5)  # a small limit so the clamps bite
        fused_up = nn.Parameter(torch.randn(E, D, 2 * F_))  # [E, in, out] as GPT-OSS stores it
        fused_down = nn.Parameter(torch.randn(E, F_, D))
        weights = ExpertWeights.from_fused(
            fused_up,
            fused_down,
            gate_up_bias=nn.Parameter(torch.randn(E, 2 * F_)),
            down_bias=nn.Parameter(torch.randn(E, D)),
            transposed=True,
        )
    else:
        act = glu_activation("silu", torch.nn.functional.silu, interleaved=variant == "interleaved")
        weights = ExpertWeights.from_fused(nn.Parameter(torch.randn(E, 2 * F_, D)), nn.Parameter(torch.randn(E, D, F_)))
    x = torch.randn(N, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    gates = torch.rand(N, k)
    w1, b1, w2, b2 = weights.tensors()
    plan = make_plan(idx, gates, torch.ones_like(idx, dtype=torch.bool), E)
    out = torch_moe_ffn(x, plan, w1, b1, w2, b2, act)
    torch.testing.assert_close(out, _loop_reference(x, idx, gates, w1, b1, w2, b2, act), atol=1e-4, rtol=1e-4)
    if variant == "clamped_swiglu":
        # The compute views are views of the fused parameters: no copies.
        assert w1.data_ptr() == fused_up.data_ptr() and w1.shape == (E, 2 * F_, D)
        assert weights.expert(3)[0].data_ptr() == fused_up[3].data_ptr()


def test_fused_expert_tensor_store_interface():
    p = nn.Parameter(torch.randn(4, 6, 3))
    t = FusedExpertTensor(p, "experts.down_proj", transposed=True)
    assert t.num_experts == 4 and t.tensor.shape == (4, 3, 6) and t.is_current()
    torch.testing.assert_close(t.expert(2), p.data[2].T)
    new = p.data.clone()
    t.set_storage(new)
    assert p.data_ptr() == new.data_ptr() and t.storage().data_ptr() == new.data_ptr()
    with pytest.raises(ValueError):
        t.set_storage(torch.zeros(4, 6))


def test_gated_activation_is_not_kernel_activation():
    act = glu_activation("silu", torch.nn.functional.silu)
    assert act.gated and not act.kernel_supported and act.name == "glu_silu"
    assert Activation("silu", torch.nn.functional.silu).kernel_supported
    with pytest.raises(ValueError):
        Activation("x", torch.sigmoid, glu="clamped_swiglu")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "glm4_moe"])
def test_accelerate_hooked_routers_run_our_forward(family):
    """A device-mapped model has accelerate hooks on every module: the routers must still run ours."""
    from accelerate.hooks import attach_execution_device_hook

    base = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        original = base(ids).logits
        want = hf_moe_opt.optimize(copy.deepcopy(base), backend="torch")(ids).logits
    hooked = copy.deepcopy(base)
    attach_execution_device_hook(hooked, "cpu")
    hf_moe_opt.optimize(hooked, backend="torch")
    for _, layer in hf_moe_opt.optimized_layers(hooked):
        router = layer.router
        if "_old_forward" in vars(router):
            assert router._old_forward.__func__ is type(router).forward
    with torch.no_grad():
        torch.testing.assert_close(hooked(ids).logits, want, rtol=0, atol=0)
        hf_moe_opt.restore(hooked)
        torch.testing.assert_close(hooked(ids).logits, original, rtol=0, atol=0)


def test_offloaded_block_without_a_cache_says_how_to_serve_it():
    from accelerate import cpu_offload

    model = tiny_model("mixtral")
    for layer in model.model.layers:
        cpu_offload(layer.mlp.experts, execution_device="cpu")
    with pytest.raises(ValueError, match=r"offloaded by accelerate.*expert_cache="):
        hf_moe_opt.optimize(model)


@pytest.mark.parametrize("method", ["noaux_tc", "bogus"])
def test_deepseek_v2_refuses_top_k_methods_its_router_lacks(method):
    """V2's router implements greedy and group-limited greedy only ("noaux_tc" is V3's): optimize()
    refuses the others, naming the two, and leaves the model as it was."""
    model = tiny_model("deepseek_v2", topk_method=method)
    with pytest.raises(ValueError, match="greedy, group_limited_greedy$"):
        hf_moe_opt.optimize(model)
    assert not hf_moe_opt.is_optimized(model)


def test_moe_blocks_left_unmatched_are_named():
    """A model mixing a supported family's blocks with another family's block, or with a subclass of
    the supported block (whose forward may differ), optimizes the supported ones and warns naming the
    rest; when all are subclasses, the error says so instead of blaming the config."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    class PatchedBlock(MixtralSparseMoeBlock):
        pass

    class ForeignBlock(nn.Module):  # another family's block: experts and a router
        def __init__(self, block: nn.Module):
            super().__init__()
            self.gate, self.experts = block.gate, block.experts

        def forward(self, x):
            return x

    model = tiny_model("mixtral")
    ids = _ids()
    model.model.layers[0].mlp = ForeignBlock(model.model.layers[0].mlp)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.warns(UserWarning, match=r"optimized 1 MoE blocks and left 1 .*layers\.0\.mlp \(ForeignBlock"):
        hf_moe_opt.optimize(model, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)

    model = tiny_model("mixtral")
    for layer in model.model.layers:
        patched = PatchedBlock(model.config)
        patched.load_state_dict(layer.mlp.state_dict())
        layer.mlp = patched.eval()
    with pytest.raises(ValueError, match=r"subclass one .*PatchedBlock subclasses the supported MixtralSparseMoeBlock"):
        hf_moe_opt.optimize(model)
    assert not hf_moe_opt.is_optimized(model)


def test_register_patch_adds_an_architecture(monkeypatch):
    """A user's block class (here a Mixtral block under another class) becomes supported through
    register_patch; a second patch for the same model type is refused."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import hf_moe_opt.patches as patches
    from hf_moe_opt.patches.mixtral import MixtralPatch

    monkeypatch.setattr(patches, "_REGISTRY", list(patches._REGISTRY))
    monkeypatch.setattr(patches, "_BY_NAME", {})

    class MyBlock(MixtralSparseMoeBlock):
        pass

    class MyPatch(MixtralPatch):
        model_type = "my_mixtral"
        block_class_name = "MyBlock"

        def block_class(self):
            return MyBlock

    ref = tiny_model("mixtral")
    model = copy.deepcopy(ref)
    for layer in model.model.layers:
        mine = MyBlock(model.config)
        mine.load_state_dict(layer.mlp.state_dict())
        layer.mlp = mine.eval()
    assert patches.find_patch(model.model.layers[0].mlp) is None
    patches.register_patch(MyPatch())
    with pytest.raises(ValueError, match="already registered"):
        patches.register_patch(MyPatch())
    assert isinstance(patches.find_patch(model.model.layers[0].mlp), MyPatch)
    hf_moe_opt.optimize(model, backend="torch")
    assert [layer.family for _, layer in hf_moe_opt.optimized_layers(model)] == ["my_mixtral", "my_mixtral"]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("margin", [0.01, 0.1, 0.5, 2.0])
def test_sparsemixer_matches_transformers(margin, dtype):
    """PhiMoE's inference routing against transformers' ``sparsemixer`` on random logits (with exact
    ties and a dominant expert mixed in): same experts in the same order, same weights, every margin."""
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    from hf_moe_opt.patches.phimoe import sparsemixer_top2

    g = torch.Generator().manual_seed(int(margin * 100))
    logits = (torch.randn(64, 16, generator=g) * 2).to(dtype)
    logits[:8, 3] = logits[:8, 5] = 4.0  # a tie for the first expert
    logits[8:16, 2] = 50.0  # a clear winner
    want_w, want_i = phimoe.sparsemixer(logits, jitter_eps=margin, training=False)
    got_w, got_i = sparsemixer_top2(logits, margin)
    assert torch.equal(got_i, want_i) and got_w.dtype == want_w.dtype == dtype
    torch.testing.assert_close(got_w, want_w, atol=0, rtol=0)
    # The margin matters: narrow, a clear winner keeps all its weight; wide, weights spread.
    if margin == 0.01:
        assert (got_w[8:16, 0] == 1).all()
    if margin == 2.0:
        assert (got_w < 1).float().mean() > 0.5


def test_longcat_flash_zero_experts_add_their_tokens():
    """LongCat-Flash's zero experts: a slot routed to one adds the token times its weight. The test
    model routes a good share of slots there, and leaving that share out changes the output."""
    ref = tiny_model("longcat_flash")
    block = _blocks(ref, "longcat_flash")[0]
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, _, indices = block.router(x.reshape(-1, 32))
    assert 0.1 < (indices >= 8).float().mean() < 0.9
    layer = find_patch(block).build(copy.deepcopy(block), ref.config, capacity="model", backend="torch")
    with torch.no_grad():
        want = block(x)
        torch.testing.assert_close(layer(x), want, **FP32)
        layer.add_shared = lambda hidden_states, routed: routed
        assert not torch.allclose(layer(x), want, atol=1e-3)


def test_longcat_flash_router_bias_is_refused():
    model = tiny_model("longcat_flash")
    block = _blocks(model, "longcat_flash")[0]
    block.router.classifier.bias = nn.Parameter(torch.zeros(12))
    with pytest.raises(ValueError, match="router_bias=True"):
        hf_moe_opt.optimize(model)
    assert not hf_moe_opt.is_optimized(model)


NEWER = ["longcat_flash", "inkling", "laguna", "lara_mini", "flint", "minicpm5_moe", "minimax_m3_vl", "beam", "axk1"]
NEWER += ["inkling2", "ergo", "deepseek_v4", "zaya", "jetmoe"]


@pytest.mark.parametrize("family", NEWER)
def test_newer_families_triton_backend_matches_transformers(family):
    """Zero experts (LongCat-Flash), per-token shared-expert gammas (Inkling), scaled routed outputs
    (Laguna) and ungated shared experts through the Triton kernels (on CPU in the interpreter): a
    prefill and one-token decode steps (the GEMV path), against transformers."""
    if not _triton_runs_here():
        pytest.skip("the Triton kernels run neither on a GPU nor in the interpreter here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = tiny_model(family).to(device)
    if device == "cuda":
        ref.set_attn_implementation("eager")
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="triton")
    prompt = _ids(batch=1, seq=4, seed=5).to(device)
    with torch.no_grad():
        torch.testing.assert_close(opt(prompt).logits, ref(prompt).logits, atol=2e-4, rtol=2e-4)
        g_ref = ref.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(opt.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0), g_ref)
    assert all(layer._backend_name(torch.device(device)) == "triton" for _, layer in hf_moe_opt.optimized_layers(opt))


def test_minimax_m3_clamped_swiglu_reads_concatenated_halves():
    """MiniMax-M3's experts: GPT-OSS's clamped SwiGLU on gate_up_proj's concatenated halves. The same
    formula on interleaved columns (GPT-OSS's layout) gives other outputs."""
    from hf_moe_opt.experts.activation import clamped_swiglu_activation

    ref = tiny_model("minimax_m3_vl")
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    (_, layer), *_ = hf_moe_opt.optimized_layers(opt)
    assert (layer.activation.glu, layer.activation.alpha, layer.activation.limit) == (
        "clamped_swiglu_halves",
        1.702,
        0.5,
    )
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(opt(ids).logits, want, **FP32)
        layer.activation = clamped_swiglu_activation(1.702, 0.5)  # interleaved
        assert not torch.allclose(opt(ids).logits, want, atol=1e-3)


def test_inkling2_softcapped_swiglu_binds():
    """Inkling 2's experts: the softcaps of the tiny model (1 and 2) bind, so a plain SwiGLU gives other
    outputs; the optimized model equals transformers'."""
    from hf_moe_opt.experts.activation import glu_activation

    ref = tiny_model("inkling2")
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    layers = hf_moe_opt.optimized_layers(opt)
    act = layers[0][1].activation
    assert (act.glu, act.alpha, act.limit) == ("softcapped_swiglu", 1.0, 2.0)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(opt(ids).logits, want, **FP32)
        for _, layer in layers:
            layer.activation = glu_activation("silu", F.silu)
        assert not torch.allclose(opt(ids).logits, want, atol=1e-3)


def test_ergo_per_expert_norms_matter():
    """Ergo normalises each expert's output with that expert's own RMSNorm weight: with one shared
    weight (expert 0's) for every expert the block is another function."""
    ref = tiny_model("ergo")
    block = _blocks(ref, "ergo")[0]
    layer = find_patch(block).build(copy.deepcopy(block), ref.config, capacity="model", backend="torch")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = block(x)
        torch.testing.assert_close(layer(x), want, **FP32)
        norm = layer.experts.post_expert_norm
        norm.weight.copy_(norm.weight[:1].expand_as(norm.weight).clone())
        assert not torch.allclose(layer(x), want, atol=1e-3)


def test_zaya_skip_class_adds_nothing():
    """ZAYA's router may send a token to its skip class (expert 0 with weight 0 from the router): the
    layer leaves those assignments out of the dispatch, and the model still equals transformers'."""
    ref = tiny_model("zaya")
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for block in _blocks(ref, "zaya"):  # the skip class competes with the experts: about half skip
            probs = block.gate(x)[0].softmax(-1)
            block.gate.balancing_biases[-1] = (probs[:, :-1].max(-1).values - probs[:, -1]).median()
        _, weights, indices, _ = _blocks(ref, "zaya")[0].gate(x)
    skipped = (weights == 0) & (indices == 0)
    assert 0.1 < skipped.float().mean() < 0.9
    opt = copy.deepcopy(ref)
    hf_moe_opt.optimize(opt, backend="torch")
    layer = hf_moe_opt.optimized_layers(opt)[0][1]
    with torch.no_grad():
        routing = layer.route(layer.router, x, None)
        assert torch.equal(routing.keep, ~skipped)
        ids = _ids()
        torch.testing.assert_close(opt(ids).logits, ref(ids).logits, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jetmoe_router_matches_transformers_sorted_rows(dtype):
    """transformers' JetMoE gating returns rows sorted by expert (with the group sizes read on the
    host); ours returns each token's choice: the same (token, expert, gate) triples, and the logits."""
    from hf_moe_opt.patches.jetmoe import OptimizedJetMoeRouter

    router = _hf_router("jetmoe").to(dtype)
    x = (torch.randn(40, 32, generator=torch.Generator().manual_seed(9)) * 2).to(dtype)
    with torch.no_grad():
        sorted_slots, token, gates, sizes, logits = router(x)
        ours = copy.deepcopy(router)
        ours.__class__ = OptimizedJetMoeRouter
        indices, _, weights, _, our_logits = ours(x)
    expert = torch.repeat_interleave(torch.arange(router.num_experts), torch.tensor(sizes))
    want = sorted(zip(token.tolist(), expert.tolist(), gates.float().tolist(), strict=True))
    k = router.top_k
    got = sorted((t, indices[t, j].item(), weights[t, j].float().item()) for t in range(x.shape[0]) for j in range(k))
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    assert [w for *_, w in got] == [w for *_, w in want]
    assert weights.dtype == gates.dtype == dtype
    torch.testing.assert_close(our_logits, logits, atol=0, rtol=0)


def test_jetmoe_step_graphs_refused_with_the_reason():
    """JetMoE's attention experts (transformers' own) read their routing on the host in every step:
    whole-step graphs are refused up front, naming that module; check_support says the same."""
    model = tiny_model("jetmoe")
    with pytest.raises(ValueError, match=r"self_attention.experts \(JetMoeMoA\) is JetMoE's mixture of attention"):
        hf_moe_opt.optimize(copy.deepcopy(model), backend="torch", cuda_graphs="step")
    report = hf_moe_opt.check_support(model.config)
    assert report.supported and "JetMoeMoA" in report.summary()
    hf_moe_opt.optimize(model, backend="torch", cuda_graphs=True)  # per-layer graphs are fine
    assert len(hf_moe_opt.optimized_layers(model)) == 2
