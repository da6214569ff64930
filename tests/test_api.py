"""The public API: optimize/restore round trips, state dicts, checkpoints, memory and errors."""

import copy
import importlib.util
import warnings

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

import hf_moe_opt
from hf_moe_opt import OptimizedMoE

from .models import VOCAB, tiny_nllb, tiny_switch

FAMILIES = {"switch": tiny_switch, "nllb": tiny_nllb}


def _ids(batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g), torch.randint(3, VOCAB, (batch, 4), generator=g)


def _logits(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_names_and_values_unchanged(family):
    model = FAMILIES[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf_moe_opt.optimize(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert hf_moe_opt.is_optimized(model)
    assert len(hf_moe_opt.optimized_layers(model)) == 4  # 2 encoder + 2 decoder layers, all sparse


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_share_one_storage_and_memory_does_not_grow(family):
    model = FAMILIES[family](num_experts=8)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hf_moe_opt.optimize(model)
    storages = {}
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    # Every parameter counted once: the stacked experts hold exactly the experts' bytes.
    assert sum(storages.values()) == nbytes
    for _, layer in hf_moe_opt.optimized_layers(model):
        stack = layer.weights.w1.tensor
        for j in range(layer.num_experts):
            w = (
                layer.experts[f"expert_{j}"].wi.weight
                if family == "switch"
                else layer.experts[f"expert_{j}"].fc1.weight
            )
            assert w.data_ptr() == stack[j].data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_gives_back_the_original_modules(family):
    model = FAMILIES[family]()
    ids, dec = _ids()
    original_types = {n: type(m) for n, m in model.named_modules()}
    want = _logits(model, ids, dec)
    hf_moe_opt.optimize(model)
    assert hf_moe_opt.restore(model) is model
    assert not hf_moe_opt.is_optimized(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    assert not any(k.startswith("_hf_moe_opt") for m in model.modules() for k in vars(m))
    torch.testing.assert_close(_logits(model, ids, dec), want, atol=0, rtol=0)
    hf_moe_opt.optimize(model)  # and it can be optimized again
    assert hf_moe_opt.is_optimized(model)
    # bf16 (the router's float32 copy of its weight is dropped), and the train/eval mode set meanwhile.
    hf_moe_opt.restore(model)
    model.to(torch.bfloat16).train()
    hf_moe_opt.optimize(model).eval()
    _logits(model, ids, dec)
    hf_moe_opt.restore(model)
    assert not any(k.startswith("_hf_moe_opt") for m in model.modules() for k in vars(m))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_expert_copies_recasts_half_precision_routers_written_through_data(family):
    """A bf16 router keeps a float32 copy; a write through ``.data`` moves no version counter, so
    sync_expert_copies (documented for such writes) casts it again."""
    base = FAMILIES[family]().to(torch.bfloat16)
    ids, dec = _ids()
    model, want_model = copy.deepcopy(base), copy.deepcopy(base)
    hf_moe_opt.optimize(model)
    before = _logits(model, ids, dec)
    g = torch.Generator().manual_seed(3)
    new = {n: torch.randn(p.shape, generator=g).bfloat16() * 5 for n, p in base.named_parameters() if "router" in n}
    assert new
    for m in (model, want_model):
        for name, p in m.named_parameters():
            if name in new:
                p.data.copy_(new[name])
    want = _logits(hf_moe_opt.optimize(want_model), ids, dec)
    assert not torch.equal(want, before)
    hf_moe_opt.sync_expert_copies(model)
    torch.testing.assert_close(_logits(model, ids, dec), want, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_expert_copies_takes_re_pointed_parameters(family):
    """``p.data = new`` on single expert parameters (as accelerate's set_module_tensor_to_device does)
    leaves the stacked experts behind until sync_expert_copies, resident or cached."""
    import warnings

    base = FAMILIES[family]()
    ids, dec = _ids()
    for kwargs in ({}, {"expert_cache": 2}):
        want_model, model = copy.deepcopy(base), copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no pinned memory without CUDA
            hf_moe_opt.optimize(model, **kwargs)
        _logits(model, ids, dec)
        g = torch.Generator().manual_seed(1)
        new = {n: torch.randn(p.shape, generator=g) for n, p in base.named_parameters() if ".experts.expert_1." in n}
        for m in (want_model, model):
            for name, p in m.named_parameters():
                if name in new:  # a middle expert's weights (and biases) re-pointed
                    p.data = new[name].clone()
        want = _logits(hf_moe_opt.optimize(want_model), ids, dec)  # optimized after the change
        hf_moe_opt.sync_expert_copies(model)
        torch.testing.assert_close(_logits(model, ids, dec), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_plain_transformers(family, tmp_path):
    model = FAMILIES[family]()
    ids, dec = _ids()
    reference = copy.deepcopy(model)
    hf_moe_opt.optimize(model)
    want = _logits(model, ids, dec)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert not hf_moe_opt.is_optimized(loaded)
    ref_sd = reference.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    hf_moe_opt.optimize(loaded)
    torch.testing.assert_close(_logits(loaded, ids, dec), want, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_moving_and_casting_after_optimize_restacks(family):
    model = FAMILIES[family]()
    ids, dec = _ids()
    hf_moe_opt.optimize(model)
    want = _logits(model, ids, dec)
    model.to(torch.bfloat16)
    for _, layer in hf_moe_opt.optimized_layers(model):
        assert layer.weights.w1.tensor.dtype == torch.bfloat16 and layer.weights.w1.is_current()
    got = _logits(model, ids, dec)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
    model.to(torch.float32)
    torch.testing.assert_close(_logits(model, ids, dec), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_runs_and_matches_fp16_reference(family):
    from .models import use_reference_blocks

    model = FAMILIES[family]().to(torch.float16)
    ids, dec = _ids()
    reference = copy.deepcopy(model)
    use_reference_blocks(reference)
    hf_moe_opt.optimize(model)
    want, got = _logits(reference, ids, dec), _logits(model, ids, dec)
    assert got.dtype == torch.float16
    assert (got.float() - want.float()).abs().max() < 0.02 * want.float().abs().max()


def test_error_no_moe_block_names_supported_classes():
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="SwitchTransformersSparseMLP.*NllbMoeSparseMLP"):
        hf_moe_opt.optimize(model)


def test_error_a_block_instead_of_the_model():
    block = tiny_switch().encoder.block[1].layer[1].mlp
    with pytest.raises(ValueError, match="is itself a sparse MoE block: pass the whole transformers model"):
        hf_moe_opt.optimize(block)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrapper_around_the_model_uses_the_inner_config(family):
    model = FAMILIES[family]()
    direct = hf_moe_opt.optimize(copy.deepcopy(model))  # (transformers' own NLLB-MoE forward differs)
    ids, dec = _ids()
    wrapper = torch.nn.ModuleDict({"inner": model})  # no .config of its own
    hf_moe_opt.optimize(wrapper)
    assert hf_moe_opt.is_optimized(wrapper) and any(isinstance(m, OptimizedMoE) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids, dec), _logits(direct, ids, dec), rtol=0, atol=0)
    hf_moe_opt.restore(wrapper)
    assert not any(isinstance(m, OptimizedMoE) for m in model.modules())


def test_error_optimizing_twice():
    model = hf_moe_opt.optimize(tiny_switch())
    with pytest.raises(ValueError, match="already optimized"):
        hf_moe_opt.optimize(model)


def test_error_restore_unoptimized():
    with pytest.raises(ValueError, match="not optimized"):
        hf_moe_opt.restore(tiny_switch())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(capacity="tight"), "capacity"),
        (dict(backend="cuda"), "backend"),
        (dict(backend=None), "backend"),
        (dict(capacity=1), "capacity"),
        (dict(cuda_graphs="steps"), "cuda_graphs"),
    ],
)
def test_error_unknown_options(kwargs, match):
    model = tiny_switch()
    with pytest.raises(ValueError, match=match):
        hf_moe_opt.optimize(model, **kwargs)
    assert not hf_moe_opt.is_optimized(model)


def test_string_options_ignore_case_and_spaces():
    # "Torch", " NONE " and "Copy" read as the documented lower-case values, as cache_policy always did.
    ids = torch.randint(0, 64, (2, 7))
    dec = torch.randint(0, 64, (2, 3))
    model = tiny_switch()
    model_copy = copy.deepcopy(model)
    plain = _logits(hf_moe_opt.optimize(copy.deepcopy(model), capacity="none", backend="torch"), ids, dec)
    optimized = hf_moe_opt.optimize(model, capacity=" NONE ", backend="Torch", cache_misses="Copy")
    layers = [m for m in optimized.modules() if isinstance(m, OptimizedMoE)]
    assert layers and {m.backend for m in layers} == {"torch"}
    assert {m.router._hf_moe_opt_capacity for m in layers} == {"none"}
    torch.testing.assert_close(_logits(optimized, ids, dec), plain, rtol=0, atol=0)
    # cache_policy too, with a cache and (the default, spelled otherwise) without one.
    cached = hf_moe_opt.optimize(copy.deepcopy(model_copy), expert_cache=2, cache_policy=" LFU ")
    assert {m.store.policy.name for m in cached.modules() if isinstance(m, OptimizedMoE)} == {"lfu"}
    hf_moe_opt.optimize(copy.deepcopy(model_copy), cache_policy=" ChangePoint ")


def test_error_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from hf_moe_opt.experts import resolve_backend

    with pytest.raises(ValueError, match="triton"):
        resolve_backend("triton", torch.device("cpu"))


def _router_classes(model):
    return [type(m).__name__ for n, m in model.named_modules() if n.endswith("router")]


@pytest.mark.parametrize("family", FAMILIES)
def test_failed_optimize_leaves_the_model_as_it_was(family, monkeypatch):
    """A failure while building the first layer (the Triton backend without CUDA) or a later one
    leaves no optimized layer and no swapped router behind: the model runs as before, restore says
    it is not optimized, and a later optimize/restore round trip works."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = FAMILIES[family]()
    ids, dec = _ids()
    before, routers = _logits(model, ids, dec), _router_classes(model)
    with pytest.raises(ValueError, match="triton"):
        hf_moe_opt.optimize(model, backend="triton")
    assert not hf_moe_opt.is_optimized(model) and _router_classes(model) == routers
    assert torch.equal(_logits(model, ids, dec), before)
    with pytest.raises(ValueError, match="not optimized"):
        hf_moe_opt.restore(model)

    # A later layer fails: the layers built before it are taken back too.
    from hf_moe_opt.patches import find_patch

    patch = next(p for p in map(find_patch, model.modules()) if p is not None)
    real_build, calls = patch.build, []

    def build_then_fail(block, config, **kw):
        calls.append(block)
        layer = real_build(block, config, **kw)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second layer")
        return layer

    monkeypatch.setattr(patch, "build", build_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        hf_moe_opt.optimize(model)
    monkeypatch.undo()
    assert len(calls) == 2 and not hf_moe_opt.is_optimized(model) and _router_classes(model) == routers
    assert torch.equal(_logits(model, ids, dec), before)
    hf_moe_opt.optimize(model)  # (transformers 5.x's own NLLB-MoE forward is wrong: no comparison here)
    assert hf_moe_opt.is_optimized(model) and _router_classes(model) != routers
    hf_moe_opt.restore(model)
    assert torch.equal(_logits(model, ids, dec), before) and _router_classes(model) == routers


def test_error_restore_and_is_optimized_need_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf_moe_opt.restore(None)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf_moe_opt.is_optimized(None)


def test_error_meta_weights():
    with torch.device("meta"):
        model = tiny_switch()
    with pytest.raises(ValueError, match="meta device"):
        hf_moe_opt.optimize(model)
    assert not hf_moe_opt.is_optimized(model)


def test_error_training_mode_forward():
    model = hf_moe_opt.optimize(tiny_switch())
    model.train()
    ids, dec = _ids()
    with pytest.raises(RuntimeError, match="inference only"):
        model(input_ids=ids, decoder_input_ids=dec)


def test_error_not_a_module():
    with pytest.raises(TypeError):
        hf_moe_opt.optimize("google/switch-base-8")


def test_supported_architectures():
    archs = hf_moe_opt.supported_architectures()
    assert archs["switch_transformers"] == "SwitchTransformersSparseMLP"
    assert archs["nllb-moe"] == "NllbMoeSparseMLP"
    from hf_moe_opt.patches import registered_patches

    assert archs == {p.model_type: p.block_class_name for p in registered_patches()}


def test_layer_repr_and_type():
    model = hf_moe_opt.optimize(tiny_nllb(num_experts=8))
    layer = model.model.encoder.layers[0].ffn
    assert isinstance(layer, OptimizedMoE)
    assert "num_experts=8" in repr(layer) and "family=nllb-moe" in repr(layer)


def test_forward_with_gradients_on_warns_once_that_experts_get_none(monkeypatch):
    """Gradients reach inputs and the router, never the expert weights: say so rather than drop them silently."""
    import warnings

    import hf_moe_opt.layer as layer_module

    monkeypatch.setattr(layer_module, "_GRAD_WARNED", False)
    model = hf_moe_opt.optimize(tiny_switch(), capacity="none")
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(input_ids=ids, decoder_input_ids=ids)
        assert not [w for w in caught if "no gradients for expert weights" in str(w.message)]
        model(input_ids=ids, decoder_input_ids=ids).logits.sum().backward()
        model(input_ids=ids, decoder_input_ids=ids)
    ours = [w for w in caught if "no gradients for expert weights" in str(w.message)]
    assert len(ours) == 1 and "torch.no_grad()" in str(ours[0].message)
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.grad is None for p in experts)  # what the warning says


def test_torch_compile_of_an_optimized_model_runs_the_layers_as_they_are():
    """torch.compile (a user's, or transformers' for static-cache generate) used to fail tracing the layer."""
    model = hf_moe_opt.optimize(tiny_switch(), capacity="none")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    encoder = model.get_encoder()  # a stack with MoE layers; the whole model takes longer to trace
    with torch.no_grad():
        want = encoder(input_ids=ids).last_hidden_state
        got = torch.compile(encoder, backend="eager")(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate_hooked_routers_run_our_forward(family):
    """Models loaded with a device map over several devices carry accelerate hooks on every module; a
    hook calls the forward bound when it was attached, which used to be the original router's."""
    from accelerate.hooks import attach_execution_device_hook

    base = FAMILIES[family]()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = base(input_ids=ids, decoder_input_ids=ids).logits
        want = hf_moe_opt.optimize(copy.deepcopy(base))(input_ids=ids, decoder_input_ids=ids).logits
    hooked = copy.deepcopy(base)
    attach_execution_device_hook(hooked, "cpu")  # as from_pretrained(device_map=...) does: every module
    assert any(hasattr(m, "_hf_hook") for m in hooked.modules())
    hf_moe_opt.optimize(hooked)
    with torch.no_grad():
        torch.testing.assert_close(hooked(input_ids=ids, decoder_input_ids=ids).logits, want, rtol=0, atol=0)
    hf_moe_opt.restore(hooked)  # the hooks call the original routers again
    with torch.no_grad():
        torch.testing.assert_close(hooked(input_ids=ids, decoder_input_ids=ids).logits, original, rtol=0, atol=0)
    # Hooks removed before optimize (as the expert cache's take-over does) or while optimized leave a
    # bound forward on each module: the routers must still run ours while optimized, theirs after.
    from accelerate.hooks import remove_hook_from_module

    for remove_before in (True, False):
        model = copy.deepcopy(base)
        attach_execution_device_hook(model, "cpu")
        if remove_before:
            remove_hook_from_module(model, recurse=True)
        hf_moe_opt.optimize(model)
        if not remove_before:
            remove_hook_from_module(model, recurse=True)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, want, rtol=0, atol=0)
            hf_moe_opt.restore(model)
            torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, original, rtol=0, atol=0)
    # Hooks attached while optimized (dispatch_model, cpu_offload after optimize) bind our forward.
    model = hf_moe_opt.optimize(copy.deepcopy(base))
    attach_execution_device_hook(model, "cpu")
    hf_moe_opt.restore(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, original, rtol=0, atol=0)


def _grad_backends() -> list[str]:
    from hf_moe_opt.kernels import kernels_interpreted

    triton_here = torch.cuda.is_available() or kernels_interpreted()
    return ["torch", "triton"] if triton_here and importlib.util.find_spec("triton") else ["torch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _grad_backends())
def test_gradients_to_inputs_and_router_match_the_reference(backend, dtype):
    """With autograd on, the layer's gradients to its input and to the router's weight are the plain
    reference's, on every backend (the Triton kernels have no backward: torch's ops take over) and for
    a bf16 model whose router runs in float32."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    from hf_moe_opt.patches import SwitchTransformersPatch
    from tests.reference import switch_reference

    torch.manual_seed(3)
    cfg = SwitchTransformersConfig(d_model=16, d_ff=32, num_experts=4, expert_capacity=4, router_dtype="float32")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = SwitchTransformersSparseMLP(cfg).eval().to(device, dtype)
    x0 = torch.randn(2, 6, 16, device=device, dtype=dtype)
    grads = []
    for which in ("reference", "optimized"):
        block = copy.deepcopy(base)
        x = x0.clone().requires_grad_(True)
        if which == "reference":
            out = switch_reference(block, x, cfg.expert_capacity)
        else:
            layer = SwitchTransformersPatch().build(block, cfg, capacity="model", backend=backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no gradients for expert weights"
                out = layer(x)
        (x + out).float().pow(2).sum().backward()
        grads.append((x.grad.float(), block.router.classifier.weight.grad))
    (gx_ref, gr_ref), (gx, gr) = grads
    assert gr is not None and gr.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gr.float(), gr_ref.float(), rtol=tol, atol=tol * gr_ref.abs().max().item())


@pytest.mark.parametrize(
    "call",
    ["optimize", "restore", "is_optimized", "optimized_layers", "stats", "reset_stats", "sync_expert_copies"],
)
def test_public_functions_name_themselves_for_a_non_module(call):
    with pytest.raises(TypeError, match=f"^{call} expects a torch.nn.Module, got NoneType$"):
        getattr(hf_moe_opt, call)(None)
    with pytest.raises(TypeError, match="^move_dense expects a torch.nn.Module, got str$"):
        hf_moe_opt.cache.move_dense("model", "cpu")
