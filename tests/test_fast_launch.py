"""Direct launches of compiled kernels (hf_moe_opt.kernels.launch) against Triton's own launch path."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hf_moe_opt.kernels import kernels_interpreted  # noqa: E402
from hf_moe_opt.kernels import launch as fast  # noqa: E402

CUDA = torch.cuda.is_available() and not kernels_interpreted()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, flag, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * alpha + tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    if flag:
        v = v * 2
    if NEGATE:
        v = -v
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _plain_kernel(x_ptr, n, stride, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    pass


def test_direct_path_only_for_runtime_args_by_position_and_constexprs_by_name():
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_plain_kernel)
    meta = {"BLOCK": 4, "FLAG": 1, "num_warps": 4}
    assert fast._keyword_params(kernel, 3, meta) == ["BLOCK", "FLAG"]
    assert fast._keyword_params(kernel, 3, {"BLOCK": 4}) is None  # FLAG missing: Triton's defaults
    assert fast._keyword_params(kernel, 2, {"stride": 3, **meta}) is None  # a runtime argument by name
    assert fast._keyword_params(kernel, 4, {"FLAG": 1}) is None  # a constexpr by position


def _axpy(x, y, alpha, flag, negate, block=64):
    out = torch.empty_like(x)
    n = x.numel()
    fast.launch(_axpy_kernel, (triton.cdiv(n, block),), x, y, out, n, alpha, flag, BLOCK=block, NEGATE=negate)
    return out


def _expected(x, y, alpha, flag, negate):
    v = x.float() * alpha + y.float()
    v = v * 2 if flag else v
    return (-v if negate else v).to(x.dtype)


def test_arg_key_is_at_least_as_fine_as_tritons_specialisation():
    libtriton = pytest.importorskip("triton._C.libtriton")
    backend = pytest.importorskip("triton.backends.compiler").BaseBackend
    specialise = getattr(libtriton, "native_specialize_impl", None)
    if specialise is None:
        pytest.skip("this Triton has no native_specialize_impl")
    base = torch.zeros(64, dtype=torch.float32)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 2**40 + 3, 2**63]
    values += [0.0, 1.0, 2.5, True, False, None]
    values += [base, base[1:], base[4:], base.half(), base.half()[1:], base.bfloat16()[8:], base.long()]
    for a, b in itertools.combinations_with_replacement(values, 2):
        if fast.arg_key((a,)) == fast.arg_key((b,)):
            assert specialise(backend, a, False, True, True) == specialise(backend, b, False, True, True), (a, b)
    # Keys tell apart what Triton tells apart in these cases, and more (1 from other odd numbers).
    assert fast.arg_key((base,)) != fast.arg_key((base[1:],))
    assert fast.arg_key((1,)) != fast.arg_key((3,)) != fast.arg_key((16,))
    assert fast.arg_key((2**31,)) != fast.arg_key((2**31 - 16,))


def test_arg_key_refuses_kinds_it_does_not_know():
    assert fast.arg_key((torch.zeros(2), "relu")) is None
    assert fast.arg_key(((1, 2),)) is None
    np = pytest.importorskip("numpy")
    assert fast.arg_key((np.int64(3),)) is None


def test_launch_hooks_are_noticed():
    """A profiler's launch hook sends launches through Triton, which calls it; none installed: direct."""
    knobs = pytest.importorskip("triton.knobs")
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton keeps a single hook, not a chain")
    assert not fast._hooks_set()

    def hook(*args):
        return None

    chain.add(hook)
    try:
        assert fast._hooks_set()
    finally:
        chain.remove(hook)
    assert not fast._hooks_set()


def test_launch_is_tritons_launch_where_nothing_is_compiled(monkeypatch):
    """In the interpreter (or with the variable at 0) every call goes through Triton and nothing is kept."""
    if CUDA:
        monkeypatch.setenv(fast.ENV_VAR, "0")
    fast.clear()
    g = torch.Generator().manual_seed(0)
    for n, flag, negate in [(5, False, False), (70, True, True), (1, True, False)]:
        x, y = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
        torch.testing.assert_close(_axpy(x, y, 0.5, flag, negate), _expected(x, y, 0.5, flag, negate))
    assert fast._COMPILED == {}


@pytest.mark.skipif(not CUDA, reason="direct launches need compiled kernels (CUDA)")
def test_direct_launch_matches_triton_on_every_specialisation(monkeypatch):
    fast.clear()
    calls = []
    run = _axpy_kernel.run

    def counted(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(_axpy_kernel, "run", counted)
    g = torch.Generator().manual_seed(1)
    cases = []
    for dtype, n, offset, flag, negate in itertools.product(
        (torch.float32, torch.bfloat16), (1, 17, 64, 200), (0, 1), (False, True), (False, True)
    ):
        cases.append((dtype, n, offset, flag, negate))
    for _ in range(3):  # the second and third rounds should not reach Triton
        for dtype, n, offset, flag, negate in cases:
            buf = torch.randn(2, n + offset, generator=g).to(DEVICE, dtype)
            x, y = buf[0, offset:], buf[1, offset:]  # offset 1: pointers not 16-byte aligned
            out = _axpy(x, y, 1.5, flag, negate)
            assert torch.equal(out, _expected(x, y, 1.5, flag, negate)) or torch.allclose(
                out.float(), _expected(x, y, 1.5, flag, negate).float(), rtol=1e-2, atol=1e-2
            )
    first_round = len(cases)
    assert len(calls) <= first_round, "repeated specialisations went through Triton again"
    assert fast.compiled_count(_axpy_kernel) == len(calls)
    # A constexpr passed positionally, or a callable grid, always goes through Triton.
    before = len(calls)
    x = torch.ones(8, device=DEVICE)
    for _ in range(2):
        out = torch.empty_like(x)
        fast.launch(_axpy_kernel, (1,), x, x, out, 8, 1.0, False, 64, NEGATE=True)
        assert torch.equal(out, -2 * x)
        fast.launch(_axpy_kernel, lambda meta: (1,), x, x, out, 8, 1.0, False, BLOCK=64, NEGATE=False)
        assert torch.equal(out, 2 * x)
    assert len(calls) == before + 4
    # So does a launch while a profiler's hook is installed (Triton calls it).
    seen = []
    fast._knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        _axpy(x, x, 1.0, False, False)
    finally:
        fast._knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(calls) == before + 5 and len(seen) == 1
    # The environment variable sends every call back through Triton.
    monkeypatch.setenv(fast.ENV_VAR, "0")
    before = len(calls)
    _axpy(torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE), 1.0, False, False)
    assert len(calls) == before + 1


@pytest.mark.skipif(not CUDA, reason="direct launches need compiled kernels (CUDA)")
def test_decode_kernels_give_the_same_bits_either_way(monkeypatch):
    from hf_moe_opt.experts.activation import Activation
    from hf_moe_opt.kernels.gemv import _gemv_act_kernel, gemv_moe_ffn
    from hf_moe_opt.kernels.router import _logits_kernel, fused_router

    g = torch.Generator().manual_seed(2)
    act = Activation("relu", torch.relu)

    def step(dtype, experts, hidden, ffn, k, bias):
        w = torch.randn(experts, hidden, generator=g).to(DEVICE, dtype)
        x = torch.randn(1, hidden, generator=g).to(DEVICE, dtype)
        w1 = (torch.randn(experts, ffn, hidden, generator=g) / hidden**0.5).to(DEVICE, dtype)
        w2 = (torch.randn(experts, hidden, ffn, generator=g) / ffn**0.5).to(DEVICE, dtype)
        b1 = torch.randn(experts, ffn, generator=g).to(DEVICE, dtype) if bias else None
        b2 = torch.randn(experts, hidden, generator=g).to(DEVICE, dtype) if bias else None
        mode = "switch" if k == 1 else "nllb"
        outs = []
        for on in ("1", "0", "1"):
            monkeypatch.setenv(fast.ENV_VAR, on)
            logits, index, gates = fused_router(x, w, None, mode=mode, logits_dtype=torch.float32, gates_dtype=dtype)
            y = gemv_moe_ffn(x, index, gates, None, w1, b1, w2, b2, act)
            outs.append((logits, index, gates, y))
        for a, b in zip(outs[0], outs[1], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(outs[2], outs[1], strict=True):
            assert torch.equal(a, b)

    fast.clear()
    for dtype, (experts, hidden, ffn), k, bias in itertools.product(
        (torch.bfloat16, torch.float32), ((8, 64, 256), (16, 96, 160)), (1, 2), (False, True)
    ):
        step(dtype, experts, hidden, ffn, k, bias)
    assert fast.compiled_count(_gemv_act_kernel) and fast.compiled_count(_logits_kernel)


def test_host_integer_helpers_match_tritons():
    for n in [*range(0, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**40 + 5]:
        assert fast.next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert fast.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_every_launch_of_ours_can_take_the_direct_path():
    """Static check of each ``launch(...)`` call: runtime parameters by position, every constexpr by
    name (``**`` of the PDL options supplies ``USE_PDL``), so none falls back to Triton silently."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "hf_moe_opt"
    options = {"num_warps", "num_stages", "launch_pdl", "num_ctas", "maxnreg"}
    checked = 0
    for path in [*root.glob("kernels/*.py"), *root.glob("dense/*.py")]:
        tree = ast.parse(path.read_text())
        constexprs = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                args = node.args.args
                constexprs[node.name] = {
                    a.arg for a in args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)
                }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "launch"):
                continue
            name = ast.unparse(node.args[0])
            assert name in constexprs, f"{path.name}: launch of {name}, not a jit kernel of this module"
            named = {k.arg for k in node.keywords if k.arg is not None} - options
            if any(k.arg is None for k in node.keywords):  # **pdl / **launch_options(...)
                named.add("USE_PDL")
            assert named == constexprs[name], f"{path.name}: {name} passes {sorted(named ^ constexprs[name])} wrongly"
            checked += 1
    assert checked >= 14
