"""Tests of model/quant.py (bf16 / int8 / int4 weight storage and kernels.c's fused kernels) against
references nobody here wrote:
- each format's definition, decoded in this file from a QuantWeight's codes / d / m tensors (bf16: the
  top half of an fp32; int8: d * q; int4: d * q + m, byte j of a 32-block holding weights j and j + 16),
  then float64 F.linear: the kernels and the torch fallback (no kernels) must equal it;
- GGUF blocks built in this file by the layout of gguf_file.py's docstring (and blocks made by the gguf
  package's quantizer): QuantWeight.from_gguf must decode them as gguf_file.dequantize / gguf do;
- plain fp32 models (and engines) whose matrices are the dequantized ones: quantized models and engines
  must give their logits / greedy tokens; the fp32 model itself bounds the quantization error;
- SmolLM2's packaged Q4_1 GGUF (slow): read as stored, its logits equal the fp32 load's.
"""

import copy
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import need

from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.infer.commands import quant_errors
from scratchllm.infer.engine import Engine
from scratchllm.model import GPT, ModelConfig, quant
from scratchllm.model.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    is_quantized,
    pack_nibbles,
    quantize_model,
    quantized_copy,
    resolve_weights,
    unpack_nibbles,
    weight_bytes,
    weight_formats,
)
from scratchllm.weights.gguf_file import dequantize as gguf_dequantize

FMTS = ["bf16", "int8", "int4"]
Q8_0, Q4_0, Q4_1 = 8, 2, 3  # GGML type ids
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20}


# --------------------------------------------------------------------------------------------- helpers
def cpu_without_kernels() -> str | None:
    """Why kernels.c cannot run on this CPU (quant.kernel_build's reason), or None when it can."""
    build, why = quant.kernel_build()
    return why if build is None else None


@pytest.fixture()
def kernels_on(monkeypatch):
    """kernels.c loaded (whatever SCRATCHLLM_NO_KERNELS says; quant._LIB is put back afterwards): skips
    where the CPU cannot run it, fails under CI where it does not build."""
    why = cpu_without_kernels()
    if why:
        pytest.skip(f"the fused kernels cannot run here: {why}")
    monkeypatch.delenv("SCRATCHLLM_NO_KERNELS", raising=False)
    monkeypatch.setattr(quant, "_LIB", False)  # not tried yet: kernels() loads (or builds) them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = quant.kernels()
    if lib is None:
        need("the fused kernels", "kernels.c did not compile or load (is a C compiler on PATH?)")
    return lib


@pytest.fixture(params=["kernels", "torch"])
def backend(request, monkeypatch):
    """The code that does the arithmetic: kernels.c, or torch ops (the fallback without kernels)."""
    if request.param == "kernels":
        request.getfixturevalue("kernels_on")
    else:
        monkeypatch.setattr(quant, "_LIB", None)
    return request.param


def f16(bits: torch.Tensor) -> np.ndarray:
    """fp16 bits stored as int16 -> float64 values."""
    return bits.numpy().view(np.float16).astype(np.float64)


def reference_weights(qw: QuantWeight) -> torch.Tensor:
    """The (N, Kp) float64 matrix that qw's tensors mean by the format's definition (not quant.py's code)."""
    Kp, gs = qw.padded, qw.group_size
    codes = qw.codes.numpy()
    if qw.fmt == "bf16":
        w = (codes.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 = fp32's top 16 bits
        return torch.from_numpy(w.astype(np.float64))
    d = np.repeat(f16(qw.d), gs, axis=1)  # (N, Kp): each group's scale
    if qw.fmt == "int8":
        return torch.from_numpy(d * codes.astype(np.float64))
    e = np.arange(Kp)  # weight e: block e // 32, position p = e % 32 in it, byte p % 16, high nibble if p >= 16
    byte = codes[:, 16 * (e // 32) + (e % 32) % 16]  # (N, Kp)
    q = np.where(e % 32 >= 16, byte >> 4, byte & 15).astype(np.float64)
    return torch.from_numpy(d * q + np.repeat(f16(qw.m), gs, axis=1))


def assert_linear(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias=None, what: str = "") -> None:
    """y (fp32) == x W^T + bias computed in float64, to 1e-4 of |x| |W|^T + |bias| (fp32 accumulation)."""
    b64 = None if bias is None else bias.double()
    ref = F.linear(x.double(), W.double(), b64)
    scale = x.double().abs() @ W.double().abs().T + (0 if bias is None else b64.abs())
    err = (y.double() - ref).abs()
    assert (err <= 1e-4 * scale + 1e-6).all(), f"{what}: max error {err.max():.3g} (scale {scale.max():.3g})"


def random_weights(N: int, K: int, seed: int) -> torch.Tensor:
    """Normal weights, each row its own scale (1e-2 .. 3), one weight in ten rows an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.empty(N, 1).uniform_(0.01, 3, generator=g)
    w[::10, K // 2] *= 20
    return w


def tiny_gpt(arch: str = "gpt2", tie: bool = True, seed: int = 0) -> GPT:
    """A 2-layer GPT-2 or Llama-style model of width 96 (int4's group 64 pads rows to 128; the Llama MLP's
    width 200 is no multiple of 32), 2-D weights scaled x4 so that greedy output varies."""
    torch.manual_seed(seed)
    kw = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_head=1, mlp_hidden=200) \
        if arch == "llama" else {}
    cfg = ModelConfig(block_size=96, vocab_size=512, n_layer=2, n_head=3, n_embd=96, tie_embeddings=tie, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


def wpe_of(model: GPT) -> nn.Module | None:
    """The learned position table (stays fp32 in every format), or None."""
    return model.transformer["wpe"] if "wpe" in model.transformer else None


def on_dequantized(model: GPT, quantized: nn.Module) -> GPT:
    """A plain fp32 copy of `model` whose matrices are those of `quantized`, dequantized."""
    ref = copy.deepcopy(model).float()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                modules[name].weight.copy_(m.weight.dequantize())
    return ref


def prompt_of(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return list(engine.generate(prompt, n, temperature=0))


# --------------------------------------------------------------------------------------------- the kernels
SHAPES = [(37, 45, None), (100, 200, 64), (5, 96, 96), (64, 768, None)]  # (N, K, group_size)
ROWS = [1, 3, 4, 8, 9, 13, quant.FUSED_ROWS, quant.FUSED_ROWS + 1]  # 8 + 4 + 1; past FUSED_ROWS: F.linear


@pytest.mark.parametrize("N, K, group", SHAPES, ids=[f"{n}x{k}-g{g}" for n, k, g in SHAPES])
@pytest.mark.parametrize("fmt", FMTS)
def test_matmul_equals_f_linear_on_reference_weights(backend, fmt, N, K, group):
    w = random_weights(N, K, seed=N * K)
    qw = QuantWeight.quantize(w, fmt, group)
    gs = 32 if fmt == "bf16" else group or quant.DEFAULT_GROUP[fmt]
    Kp = -(-K // gs) * gs
    assert (qw.fmt, qw.shape, qw.group_size, qw.padded) == (fmt, (N, K), gs, Kp)
    W = reference_weights(qw)  # (N, Kp) float64
    assert W.shape == (N, Kp) and torch.isfinite(W).all()
    if fmt == "bf16":
        assert torch.equal(W[:, :K].float(), w.bfloat16().float())  # round to nearest bf16
    W = W[:, :K]
    g = torch.Generator().manual_seed(7)
    for R in ROWS:
        x = torch.randn(R, K, generator=g)
        if R == 3:
            x = torch.randn(K, R, generator=g).T  # not contiguous
        # the AVX512-BF16 build multiplies bf16 weights by x rounded to bf16 (round to nearest even)
        rounded = backend == "kernels" and fmt == "bf16" and quant.bf16_inputs() and R <= quant.FUSED_ROWS
        x_ref = x.bfloat16().float() if rounded else x
        for bias in (None, torch.randn(N, generator=g)):
            y = qw.matmul(x, bias)
            assert y.dtype == torch.float32 and y.shape == (R, N)
            assert_linear(y, x_ref, W, bias, f"{R} rows, bias {bias is not None}")


@pytest.mark.parametrize("fmt, group", [("int8", 32), ("int8", 96), ("int4", 64), ("int4", 32), ("int4", 128)])
def test_quantization_error_is_half_a_step(fmt, group):
    N, K = 24, 300
    w = random_weights(N, K, seed=3)
    w[1, :group] = 0.0  # an all-zero group: d = 0, exactly 0 again
    w[2, :group] = 0.1  # a constant group
    qw = QuantWeight.quantize(w, fmt, group)
    G = qw.padded // group
    W = reference_weights(qw)
    err = (W[:, :K] - w.double()).abs()
    assert torch.equal(W[1, :group], torch.zeros(group, dtype=torch.float64))
    d = torch.from_numpy(f16(qw.d))  # (N, G)
    wg = F.pad(w.double(), (0, qw.padded - K)).view(N, G, group)  # the groups as quantized (zeros past K)
    err_g = F.pad(err, (0, qw.padded - K)).view(N, G, group).amax(-1)  # (N, G)
    noise = 1e-6 * wg.abs().amax(-1)  # fp32 arithmetic
    if fmt == "int8":
        assert qw.codes.dtype == torch.int8 and qw.codes.abs().max() <= 127
        assert torch.allclose(d, (wg.abs().amax(-1) / 127), rtol=2**-10, atol=0)  # amax / 127 in fp16
        bound = d / 2
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        m = torch.from_numpy(f16(qw.m))
        assert torch.allclose(d, (hi - lo) / 15, rtol=2**-10, atol=0) and torch.allclose(m, lo, rtol=2**-10, atol=0)
        # w in [lo, hi] maps to (w - m) / d in [-1/2, 15 + 1/2] up to the fp16 rounding of m and d
        bound = d / 2 + (m - lo).abs() + 15 * (d - (hi - lo) / 15).abs()
    assert (err_g <= bound + noise).all(), f"worst error / bound: {(err_g / (bound + noise + 1e-30)).max():.4f}"
    assert (err_g[d > 0] <= 0.501 * d[d > 0] + noise[d > 0]).float().mean() > 0.99  # d/2, but for fp16 roundings
    e, s = qw.error
    assert e == pytest.approx(float(err.square().sum()), rel=1e-5)
    assert s == pytest.approx(float(w.double().square().sum()), rel=1e-9)


def test_bf16_error_is_half_a_bf16_step():
    w = random_weights(10, 70, seed=5)
    qw = QuantWeight.quantize(w, "bf16")
    err = (reference_weights(qw)[:, :70] - w.double()).abs()
    assert (err <= w.double().abs() * 2**-8).all()  # 8 significant bits: half a unit in the last place


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_equals_the_definition_and_picks_rows(backend, fmt):
    N, K = 41, 100
    qw = QuantWeight.quantize(random_weights(N, K, seed=11), fmt)
    full = qw.dequantize()
    assert full.shape == (N, K) and full.dtype == torch.float32
    assert torch.equal(full, reference_weights(qw)[:, :K].float())  # exact: d * q is exact in fp32
    assert torch.equal(full, qw._dequantize_torch()[:, :K])
    idx = torch.tensor([5, 0, 5, N - 1, 2])
    assert torch.equal(qw.dequantize(idx), full[idx])
    assert torch.equal(qw.dequantize(idx.view(1, 5).int()), full[idx])  # any shape and integer dtype: (R, K)
    assert torch.equal(qw.take_rows(idx).dequantize(), full[idx])


@pytest.mark.parametrize("fmt", FMTS)
def test_kernel_dequantize_refuses_rows_out_of_range_and_takes_none(kernels_on, fmt):
    qw = QuantWeight.quantize(random_weights(6, 64, seed=0), fmt)
    for bad in ([6], [-1], [0, 7]):
        with pytest.raises(ScratchError, match=r"row ids must be in \[0, 6\)"):
            qw.dequantize(torch.tensor(bad))
    assert qw.dequantize(torch.tensor([], dtype=torch.long)).shape == (0, 64)


@pytest.mark.parametrize("fmt", FMTS)
def test_torch_dequantize_checks_rows_like_the_kernels(monkeypatch, fmt):
    monkeypatch.setattr(quant, "_LIB", None)
    qw = QuantWeight.quantize(random_weights(6, 64, seed=0), fmt)
    assert qw.dequantize(torch.tensor([], dtype=torch.long)).shape == (0, 64)
    for bad in ([6], [-1]):
        with pytest.raises(ScratchError, match=r"row ids must be in \[0, 6\)"):
            qw.dequantize(torch.tensor(bad))


def test_pack_nibbles_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (3, 96), dtype=torch.uint8, generator=g)
    packed = pack_nibbles(q)
    assert packed.shape == (3, 48) and packed.dtype == torch.uint8
    for r in range(3):
        for block in range(3):
            for j in range(16):
                low, high = int(q[r, 32 * block + j]), int(q[r, 32 * block + j + 16])
                assert int(packed[r, 16 * block + j]) == low | high << 4
    assert torch.equal(unpack_nibbles(packed), q)
    b = torch.randint(0, 256, (5, 64), dtype=torch.uint8, generator=g)
    assert torch.equal(pack_nibbles(unpack_nibbles(b)), b)


def test_cat_stacks_rows_and_refuses_mixed_formats():
    a = QuantWeight.quantize(random_weights(7, 90, seed=1), "int4")
    b = QuantWeight.quantize(random_weights(3, 90, seed=2), "int4")
    c = QuantWeight.cat([a, b])
    assert c.shape == (10, 90) and torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert c.error == pytest.approx((a.error[0] + b.error[0], a.error[1] + b.error[1]))
    for other in (QuantWeight.quantize(random_weights(3, 90, seed=2), "int8"),
                  QuantWeight.quantize(random_weights(3, 90, seed=2), "int4", 64),
                  QuantWeight.quantize(random_weights(3, 91, seed=2), "int4")):
        with pytest.raises(ScratchError, match="cannot stack"):
            QuantWeight.cat([a, other])


def test_quantize_refusals():
    w = torch.randn(4, 64)
    for fmt in ("fp32", "int3", "fp16"):
        with pytest.raises(ScratchError, match="unknown weight format"):
            QuantWeight.quantize(w, fmt)
    for group in (0, 48, 16, -32, 32.0):
        with pytest.raises(ScratchError, match="group_size must be a positive multiple of 32"):
            QuantWeight.quantize(w, "int4", group)


def test_quantize_a_parameter_without_warnings():
    w = nn.Parameter(torch.randn(4, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantWeight.quantize(w, "int8")


# --------------------------------------------------------------------------------------------- GGUF blocks
def gguf_blocks(qtype: int, N: int, K: int, seed: int) -> np.ndarray:
    """Random GGUF blocks of a (N, K) tensor, per gguf_file.py's layouts: fp16 d (| fp16 m) | 32 int8
    or 16 bytes of nibbles; some scales 0 or negative, int8 codes over the full -128..127."""
    rng = np.random.default_rng(seed)
    G = K // 32
    d = (rng.standard_normal((N, G, 1)) * 0.05).astype("<f2")
    d[0, 0] = 0.0
    parts = [d.view(np.uint8)]
    if qtype == Q4_1:
        parts.append((rng.standard_normal((N, G, 1)) * 0.3).astype("<f2").view(np.uint8))
    if qtype == Q8_0:
        qs = rng.integers(-128, 128, (N, G, 32)).astype(np.int8)
        qs[-1, -1, :2] = (-128, 127)
        parts.append(qs.view(np.uint8))
    else:
        parts.append(rng.integers(0, 256, (N, G, 16)).astype(np.uint8))
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape == (N, G, BLOCK_BYTES[qtype])
    return blocks.reshape(-1)


@pytest.mark.parametrize("N, K", [(1, 32), (7, 96), (33, 256)])
@pytest.mark.parametrize("qtype", [Q8_0, Q4_0, Q4_1], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_from_gguf_decodes_like_gguf_file(backend, qtype, N, K):
    raw = gguf_blocks(qtype, N, K, seed=N + K + qtype)
    ref = gguf_dequantize(raw, qtype, (N, K))  # the numpy reference, float32
    for data in (raw, raw.tobytes()):
        qw = QuantWeight.from_gguf(data, qtype, (N, K))
        assert (qw.fmt, qw.shape, qw.group_size) == ("int8" if qtype == Q8_0 else "int4", (N, K), 32)
        assert torch.equal(qw.dequantize(), ref)  # exact (a Q4_0 block of scale 0 gives +0 where numpy has -0)
    assert torch.equal(reference_weights(qw).float(), ref)
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    assert_linear(qw.matmul(x), x, ref)


def test_from_gguf_equals_the_gguf_package(gguf_package):
    gguf = gguf_package
    x = random_weights(12, 128, seed=4).numpy()
    for qtype in (Q8_0, Q4_0, Q4_1):
        t = gguf.GGMLQuantizationType(qtype)
        data = gguf.quants.quantize(x, t)
        ref = gguf.quants.dequantize(data, t).reshape(x.shape).astype(np.float32)
        got = QuantWeight.from_gguf(data, qtype, x.shape).dequantize()
        assert torch.equal(got, torch.from_numpy(ref)), t.name  # exact (up to the sign of zeros)


def test_from_gguf_refusals():
    raw = gguf_blocks(Q4_1, 4, 64, seed=0)
    with pytest.raises(ScratchError, match="w.q: 159 bytes, expected 160 for Q4_1 4x64"):
        QuantWeight.from_gguf(raw[:-1], Q4_1, (4, 64), "w.q")
    with pytest.raises(ScratchError, match="bytes, expected"):
        QuantWeight.from_gguf(raw, Q4_0, (4, 64))  # 20-byte blocks read as 18-byte ones
    with pytest.raises(ScratchError, match="not whole blocks of 32"):
        QuantWeight.from_gguf(raw, Q4_1, (5, 48))
    for qtype in (0, 6, 12):  # F32, Q5_0, Q4_K
        with pytest.raises(ScratchError, match=f"GGML type {qtype} is not one QuantWeight reads"):
            QuantWeight.from_gguf(raw, qtype, (4, 64))


# --------------------------------------------------------------------------------------------- modules, models
def test_quant_linear_and_embedding():
    lin = nn.Linear(45, 37)
    ql = QuantLinear(QuantWeight.quantize(lin.weight.detach(), "int8"), lin.bias)
    W = ql.weight.dequantize()
    x = torch.randn(2, 3, 45)
    y = ql(x)
    assert y.shape == (2, 3, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, W, lin.bias.detach()), rtol=1e-5, atol=1e-5)
    yb = ql(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(x.bfloat16().float(), W, lin.bias.detach()), rtol=1e-2, atol=1e-2)
    with pytest.raises(ScratchError, match="expects inputs of 45 features, got 44"):
        ql(torch.randn(3, 44))
    emb = QuantEmbedding(QuantWeight.quantize(torch.randn(50, 70), "int4"))
    idx = torch.tensor([[3, 49, 0], [3, 3, 7]])
    assert torch.equal(emb(idx), emb.weight.dequantize()[idx])


def test_quant_linear_bias_survives_a_dtype_cast(kernels_on):
    N, K = 8, 64
    ql = QuantLinear(QuantWeight.quantize(torch.randn(N, K), "int8"), 10 + torch.arange(N, dtype=torch.float32))
    ql = ql.to(torch.bfloat16)
    x = torch.randn(2, K)
    ref = F.linear(x, ql.weight.dequantize(), ql.bias.float())
    torch.testing.assert_close(ql(x.bfloat16()).float(), ref, rtol=2e-2, atol=2e-1)


ARCHS = ["gpt2", "llama"]
LOGIT_ERROR = {"bf16": 2e-2, "int8": 2e-2, "int4": 0.5}  # random weights x4 amplify int4's rounding  # |logits - fp32 logits| / |fp32 logits|


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_model(arch, tie, fmt):
    model = tiny_gpt(arch, tie)
    original = copy.deepcopy(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    assert linears and ("lm_head" in linears)
    q = quantize_model(model, fmt)
    assert q is model
    modules = dict(q.named_modules())
    assert not [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) and n != "transformer.wpe"]
    head = quant.HEAD_FORMAT[fmt]  # int4 models keep their embedding and head in int8
    for name, lin in linears.items():
        ql = modules[name]
        want = head if name == "lm_head" else fmt
        assert type(ql) is QuantLinear and ql.weight.fmt == want and ql.weight.shape == tuple(lin.weight.shape)
        if lin.bias is not None:
            assert torch.equal(ql.bias, lin.bias)
    assert type(q.transformer.wte) is QuantEmbedding and q.transformer.wte.weight.fmt == head
    assert (q.lm_head.weight is q.transformer.wte.weight) == tie
    assert all(p.dtype == torch.float32 for p in q.parameters())
    assert is_quantized(q) and not is_quantized(original)
    n_blocks = len(linears) - 1  # all but the head
    want_formats = {fmt: n_blocks + 2} if head == fmt else {fmt: n_blocks, head: 2}
    assert weight_formats(q) == want_formats  # a position table (gpt2's wpe) is not counted

    idx = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))  # 140 rows: F.linear
    with torch.no_grad():
        want = original(idx)
        ref = on_dequantized(original, q)(idx)
        tol = 1e-4
        for x in (idx, idx[:, :5]):  # 10 rows: the fused kernels (x rounded to bf16 for bf16 on AVX512-BF16)
            torch.testing.assert_close(q(x), ref[:, :x.shape[1]], rtol=tol, atol=tol * float(ref.abs().max()))
            tol = 2e-2 if fmt == "bf16" and quant.bf16_inputs() else tol
        got = q(idx)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < LOGIT_ERROR[fmt], f"{fmt}: logits off by {rel:.3%} of fp32's"

    # quant_errors: rms rounding error over every distinct matrix, relative to the weights' rms
    mats = {id(m.weight): m.weight for m in original.modules() if isinstance(m, (nn.Linear, nn.Embedding))
            and m is not wpe_of(original)}
    qmods = {id(original.get_submodule(n).weight): m.weight for n, m in modules.items()
             if isinstance(m, (QuantLinear, QuantEmbedding))}
    sq_err = sum(float((qmods[k].dequantize().double() - w.detach().double()).square().sum()) for k, w in mats.items())
    sq = sum(float(w.detach().double().square().sum()) for w in mats.values())
    errors = dict(quant_errors(q))
    if head == fmt:
        assert list(errors) == [fmt] and errors[fmt] == pytest.approx(math.sqrt(sq_err / sq), rel=1e-4)
    else:  # int4 blocks, int8 head
        assert sorted(errors) == sorted([fmt, head]) and 0 < errors[head] < errors[fmt]


def expected_bytes(model: GPT, fmt: str) -> int:
    """Bytes of `model` stored as `fmt`, by the formats' definitions: every matrix once (a tied pair once;
    for int4 the embedding and head in int8), rows padded to groups of 32, fp16 scales (and int4
    minimums); the other parameters fp32."""
    heads = {id(model.lm_head.weight), id(model.transformer.wte.weight)}  # int4 models keep these in int8
    matrices = {id(m.weight): m.weight for m in model.modules() if type(m) in (nn.Linear, nn.Embedding)
                and m is not wpe_of(model)}
    total = 0
    for key, w in matrices.items():
        f = {"int4": "int8"}.get(fmt, fmt) if key in heads else fmt
        gs = 32
        N, K = w.shape
        Kp = -(-K // gs) * gs
        total += {"bf16": 2 * N * Kp, "int8": N * Kp + 2 * N * Kp // gs, "int4": N * Kp // 2 + 4 * N * Kp // gs}[f]
    rest = {id(p): p for p in model.parameters() if id(p) not in matrices}
    return total + 4 * sum(p.numel() for p in rest.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_bytes(arch):
    kw = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False) if arch == "llama" else {}
    model = GPT(ModelConfig.from_preset("tiny", n_layer=2, **kw))  # the position table weighs less than in tiny_gpt
    n = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model) == 4 * n
    bf16 = weight_bytes(copy.deepcopy(model).to(torch.bfloat16))
    assert bf16 == 2 * n
    sizes = {fmt: weight_bytes(quantized_copy(model, fmt)) for fmt in FMTS}
    assert sizes == {fmt: expected_bytes(model, fmt) for fmt in FMTS}
    assert sizes["int4"] < 0.5 * bf16 and sizes["int8"] < 0.65 * bf16 and sizes["bf16"] < 1.05 * bf16
    assert weight_bytes(quantized_copy(model, "int4", head="int4")) < 0.35 * bf16  # all int4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_quantized_copy_leaves_the_model_alone(dtype, fmt):
    model = tiny_gpt("gpt2", tie=True).to(dtype)
    before = {k: (v.clone(), v.data_ptr(), v.dtype) for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)
    q = quantized_copy(model, fmt)
    with torch.no_grad():
        q(idx)
        assert torch.equal(model(idx), logits)
    assert [type(m) for m in model.modules()] == types and not is_quantized(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (v, ptr, dt) in before.items():
        assert after[k].dtype == dt and after[k].data_ptr() == ptr and torch.equal(after[k], v), k
    assert model.lm_head.weight is model.transformer.wte.weight
    assert is_quantized(q) and q.lm_head.weight is q.transformer.wte.weight
    assert all(p.dtype == torch.float32 for p in q.parameters())
    if dtype == torch.float32:  # the fp32 tensors that stay are shared, not copied
        assert q.transformer.ln_f.weight is model.transformer.ln_f.weight
    # the copy's weights are the model's, quantized
    ref = QuantWeight.quantize(model.transformer.h[0].attn.c_attn.weight.float(), fmt)
    assert torch.equal(q.transformer.h[0].attn.c_attn.weight.codes, ref.codes)


def test_quantize_model_refusals():
    from scratchllm.model.lora import apply_lora

    model = tiny_gpt("llama")
    with pytest.raises(ScratchError, match="unknown weight format 'int3'"):
        quantize_model(model, "int3")
    q = quantized_copy(model, "int8")
    with pytest.raises(ScratchError, match="already quantized"):
        quantize_model(q, "int4")
    with torch.device("meta"):
        meta = GPT(model.config)
    with pytest.raises(ScratchError, match="CPU only"):
        quantize_model(meta, "int4")
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=2, alpha=4)
    with pytest.raises(ScratchError, match="merge adapters"):
        quantize_model(lora, "int4")
    assert not is_quantized(model)


def test_resolve_weights():
    f32, bf16 = torch.float32, torch.bfloat16
    for fmt in ("int8", "int4"):
        with pytest.raises(ScratchError, match="CPU only"):
            resolve_weights(fmt, "cuda", f32)
    assert resolve_weights("auto", "cuda", f32) == "fp32" and resolve_weights("auto", "cuda", bf16) == "bf16"
    assert resolve_weights("bf16", "cuda", f32) == "bf16"
    for fmt in ("fp32", "bf16", "int8", "int4"):
        assert resolve_weights(fmt, "cpu", f32) == fmt
    with pytest.raises(ScratchError, match="unknown --weights 'int3'"):
        resolve_weights("int3", "cpu", f32)


def test_resolve_auto_weights_on_the_cpu(kernels_on, monkeypatch):
    assert resolve_weights("auto", "cpu", torch.float32) == "bf16"
    monkeypatch.setattr(quant, "_LIB", None)  # no kernels: the model's own dtype
    assert resolve_weights("auto", "cpu", torch.float32) == "fp32"
    assert resolve_weights("auto", "cpu", torch.bfloat16) == "bf16"


# --------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_greedy_equals_plain_engine_on_dequantized_weights(backend, arch, fmt):
    model = tiny_gpt(arch, tie=arch == "gpt2")
    engine = Engine(model, weights=fmt)
    assert engine.runner is not model and is_quantized(engine.runner) and not is_quantized(model)
    assert fmt in engine.weights.split("+") and engine.dtype == torch.float32
    ref = Engine(on_dequantized(model, engine.runner))
    assert not is_quantized(ref.runner)
    seen = set()
    for prompt in (prompt_of(5), prompt_of(70, seed=2)):  # 70 prompt rows > FUSED_ROWS: dequantize + F.linear
        tokens = greedy(engine, prompt, 16)
        assert tokens == greedy(ref, prompt, 16)
        seen |= set(tokens)
    assert len(seen) > 4, "a degenerate model: greedy output repeats one token"
    prompts = [prompt_of(3, seed=3), prompt_of(9, seed=4), prompt_of(4, seed=5)]  # 3 rows per decode step
    assert engine.generate_batch(prompts, 8, temperature=0) == ref.generate_batch(prompts, 8, temperature=0)


def test_engine_on_a_quantized_model_runs_it_as_it_is():
    model = quantize_model(tiny_gpt("llama"), "int4")
    for weights in (None, "auto", "int4"):
        engine = Engine(model, weights=weights)
        assert engine.runner is model and engine.weights == "int4+int8"  # int8 embedding and head
    assert len(greedy(Engine(model), prompt_of(4), 5)) == 5


def test_engine_auto_weights_are_bf16_with_kernels(kernels_on, monkeypatch):
    model = tiny_gpt("llama")  # no position table: every matrix is quantized
    engine = Engine(model, weights="auto")
    assert engine.weights == "bf16" and engine.runner is not model and is_quantized(engine.runner)
    monkeypatch.setattr(quant, "_LIB", None)  # no kernels: the model as it is
    engine = Engine(model, weights="auto")
    assert engine.weights == "fp32" and engine.runner is model


def test_engine_weights_refusals():
    model = tiny_gpt("llama")
    q = quantized_copy(model, "int4")
    with pytest.raises(ScratchError, match="already quantized"):
        Engine(q, weights="int8")
    with pytest.raises(ScratchError, match="pack=True cannot apply to a quantized model"):
        Engine(q, pack=True)
    for fmt in ("int4", "int8"):
        with pytest.raises(ScratchError, match=f"pack=True cannot apply to {fmt} weights"):
            Engine(model, weights=fmt, pack=True)
    with pytest.raises(ScratchError, match="unknown --weights 'int3'"):
        Engine(model, weights="int3")
    with pytest.raises(ScratchError, match="cast it"):
        Engine(copy.deepcopy(model).to(torch.bfloat16), weights="fp32")


def test_engine_refuses_fp32_weights_on_an_int4_gpt2_model():
    q = quantized_copy(tiny_gpt("gpt2"), "int4")
    with pytest.raises(ScratchError, match="already quantized"):
        Engine(q, weights="fp32")


# --------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny Llama-style model with its tokenizer: (folder, model, tokenizer)."""
    from scratchllm.tokenizer import train_bpe
    from scratchllm.weights.checkpoint import save_model

    tok = train_bpe(["hello world, hello there. the cat sat on the mat. " * 20], vocab_size=280,
                    special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=64, vocab_size=288, n_layer=1, n_head=2, n_embd=64, norm="rmsnorm",
                      positions="rope", mlp="swiglu", bias=False)
    model = GPT(cfg).eval()
    return save_model(model, tok, tmp_path_factory.mktemp("quant") / "model"), model, tok


def run_cli(args: list[str], capfd) -> tuple[int, str, str]:
    """`scratchllm ARGS` in-process, as test_cli_errors.py runs it: (exit code, stdout, stderr)."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


GEN = "generate --prompt hi --max-new-tokens 2 --device cpu --model {m}"
CLI_ERRORS = [
    ("int4 computing in bf16", f"{GEN} --weights int4 --precision bf16", "computes in fp32"),
    ("int8 computing in fp16", f"{GEN} --weights int8 --precision fp16", "computes in fp32"),
    ("fp32 weights, bf16 compute", f"{GEN} --weights fp32 --precision bf16",
     "--weights fp32 with --precision bf16"),
    ("unknown format", f"{GEN} --weights int3", "invalid choice: 'int3'"),
    ("chat: unknown format", "chat --model {m} --weights int3", "invalid choice: 'int3'"),
    ("serve: unknown format", "serve --model {m} --weights int3", "invalid choice: 'int3'"),
]


@pytest.mark.parametrize("argv, text", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_weight_errors(model_folder, capfd, argv, text):
    code, _, err = run_cli(argv.format(m=model_folder[0]).split(), capfd)
    assert code == 2, err
    lines = err.splitlines()
    first = next((i for i, line in enumerate(lines) if "error: " in line), None)
    assert first is not None, f"no `error: ` line in stderr:\n{err}"
    assert text in "\n".join(lines[first:])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cli_int_weights_on_a_gpu_are_refused(model_folder, capfd, monkeypatch, fmt):
    if not torch.cuda.is_available():  # the refusal comes before anything touches the device
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, _, err = run_cli(GEN.format(m=model_folder[0]).replace("cpu", "cuda").split() + ["--weights", fmt], capfd)
    assert code == 2 and f"--weights {fmt} runs on the CPU only" in err, err


def test_cli_generate_with_int4_weights_equals_the_engine(kernels_on, model_folder, capfd):
    folder, model, tok = model_folder
    prompt = "hello the"
    engine = Engine(quantized_copy(model, "int4"), tok)
    want = tok.decode(list(engine.generate(tok.encode(prompt), 8, temperature=0, stop=[tok.eot_token])))
    code, out, err = run_cli(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "8",
                              "--temperature", "0", "--device", "cpu", "--weights", "int4"], capfd)
    assert code == 0, err
    assert out == prompt + want + "\n"
    assert "[cpu, fp32, int4+int8 weights (" in err and "rounding error (rms, relative to each matrix) int4 " in err


# --------------------------------------------------------------------------------------------- GGUF files
class _Weights:
    """What open_weights_helpers.write_gguf reads of a transformers Llama: .config and .state_dict()
    (random tensors under HF's names), without importing transformers."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.config = SimpleNamespace(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
        c, g = self.config, torch.Generator().manual_seed(seed)
        shapes = {"model.embed_tokens.weight": (c.vocab_size, 64)}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
                           p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
                           p + "mlp.gate_proj.weight": (96, 64), p + "mlp.up_proj.weight": (96, 64),
                           p + "mlp.down_proj.weight": (64, 96), p + "input_layernorm.weight": (64,),
                           p + "post_attention_layernorm.weight": (64,)})
        shapes.update({"model.norm.weight": (64,), "lm_head.weight": (c.vocab_size, 64)})
        self.tensors = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.2 * torch.randn(s, generator=g)
                        for k, s in shapes.items()}

    def state_dict(self):
        return self.tensors


@pytest.fixture(scope="module")
def gguf_files(gguf_package, tmp_path_factory):
    """Tiny Llama GGUF files (llama.cpp's names, permuted Q/K rows) with a real tokenizer's metadata:
    "uniform": q/k/v and gate/up of one format each (Q4_0/Q4_1 -> int4); "mixed": Q8_0, Q4_0, Q4_1 cycling."""
    from open_weights_helpers import gguf_tokenizer_metadata, train_tiny_chat_tokenizer, write_gguf

    T = gguf_package.GGMLQuantizationType
    tok = train_tiny_chat_tokenizer()
    meta = gguf_tokenizer_metadata(gguf_package, tok)
    folder = tmp_path_factory.mktemp("quant_gguf")
    weights = _Weights(tok.vocab_size)
    return {key: write_gguf(gguf_package, folder / f"{key}.gguf", weights, qtypes=qtypes, tokenizer=meta)
            for key, qtypes in (("uniform", (T.Q4_0, T.Q4_1)), ("mixed", (T.Q8_0, T.Q4_0, T.Q4_1)))}


def quantized_vs_fp32(path):
    """(load_gguf_quantized's model, load_gguf_model's fp32 model, {name: (QuantWeight, fp32 weight)})."""
    from scratchllm.weights.gguf import load_gguf_model, load_gguf_quantized

    q, _, _, _ = load_gguf_quantized(path, progress=False)
    ref, f = load_gguf_model(path, progress=False)
    f.close()
    refs = dict(ref.named_modules())
    pairs = {name: (m.weight, refs[name].weight) for name, m in q.named_modules()
             if isinstance(m, (QuantLinear, QuantEmbedding))}
    return q, ref, pairs


def test_gguf_blocks_read_as_stored(gguf_files):
    q, ref, pairs = quantized_vs_fp32(gguf_files["uniform"])
    assert weight_formats(q) == {"int4": 10} and quant_errors(q) == []
    for name, (qw, w) in pairs.items():
        assert qw.group_size == 32 and torch.equal(qw.dequantize(), w), name  # exact: the file's own numbers
    idx = torch.randint(0, q.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(idx) - ref(idx)).abs().max() < 1e-4


def test_gguf_fused_matrix_of_mixed_types_keeps_its_precision(gguf_files):
    q, ref, pairs = quantized_vs_fp32(gguf_files["mixed"])
    for name, (qw, w) in pairs.items():
        rel = float((qw.dequantize() - w.detach()).norm() / w.detach().norm())
        assert rel < 0.01, f"{name}: {qw.fmt} group {qw.group_size}, {rel:.2%} off the file's weights"


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """SmolLM2's packaged Q4_1 file read as stored, and as fp32 (+ its tokenizer)."""
    from scratchllm.weights.gguf import load_gguf, load_gguf_quantized

    q, _, _, _ = load_gguf_quantized(smollm2_gguf, progress=False)
    ref, tok, _, _ = load_gguf(smollm2_gguf, progress=False)
    return q, ref, tok


@pytest.mark.slow
def test_smollm2_gguf_as_stored_equals_fp32(smollm2_pair):
    q, ref, tok = smollm2_pair
    assert weight_formats(q) == {"int4": 120, "int8": 2} and quant_errors(q) == []
    refs = dict(ref.named_modules())
    for name, m in q.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            assert torch.equal(m.weight.dequantize(), refs[name].weight), name
    assert q.lm_head.weight is q.transformer.wte.weight
    assert weight_bytes(q) < 0.25 * weight_bytes(ref)
    ids = tok.encode("The capital of France is Paris. The capital of Italy is Rome, the capital of Spain is Madrid, "
                     "and the capital of Germany is")
    x = torch.tensor([ids[:20]])
    assert x.shape == (1, 20)
    with torch.no_grad():
        assert (q(x) - ref(x)).abs().max() <= 1e-3
