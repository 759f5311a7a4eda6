"""Weight-only storage for CPU inference: bf16, int8 and int4 weights with fused dequantizing kernels.

What it does: batch-1 decoding reads every weight once per token, so its speed is memory bandwidth /
bytes of the weights. `quantize_model(model, "int4")` replaces (in place) every nn.Linear of a GPT and
its token embedding by `QuantLinear` / `QuantEmbedding` modules that keep a `QuantWeight`:
- bf16: the weights rounded to bfloat16 (2 bytes each);
- int8: symmetric, w = d * q, q in -127..127, one fp16 scale d per group of `group_size` weights of a
  row (default 32: 1.06 bytes a weight; GGUF's Q8_0 exactly);
- int4: affine, w = d * q + m, q in 0..15, fp16 d and m per group (default 32: 0.625 bytes a weight,
  GGUF's Q4_1; Q4_0 is m = -8 d). As in llama.cpp's Q4 files, the token embedding and the output
  head stay int8 (`head=`): an int4 head cost SmolLM2 7% of perplexity (docs/quantization.md).
A tied token embedding and head share one QuantWeight. Everything else (norms, position embeddings,
attention, the KV cache) runs in fp32. `QuantWeight.from_gguf` takes GGUF Q8_0/Q4_0/Q4_1 blocks as
they are stored, never through fp32 (weights/gguf.py: load_gguf_quantized).
The forward pass: a few rows (decode: at most FUSED_ROWS) go to kernels.c, compiled once with the
system's C compiler into the cache (~/.cache/scratchllm/kernels): each block of 32 weights is
dequantized in registers and multiplied into every row of x, so the weights stream once (on CPUs
with AVX512-BF16, bf16 weights instead meet x rounded to bf16 in the bf16 dot-product instruction);
more rows (a long prompt's prefill) dequantize the matrix to fp32 and use F.linear (MKL). Without a C compiler or
an x86 CPU with AVX2/FMA/F16C (or with SCRATCHLLM_NO_KERNELS=1), every call dequantizes with torch
ops: correct, but slower than fp32 (a warning says so once).
What it does not do: training (no gradients), GPUs (there: --weights fp32/bf16), or integer
activations (x stays fp32, or bf16 as above: the cost is the weights' rounding).

    model = quantize_model(model, "int4")       # in place; the fp32 weights are freed
    engine = Engine(model, tokenizer)           # decodes with the int4 kernels
    weight_bytes(model)                         # bytes of all weights, as stored
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchllm.common import ScratchError, cpu_flags

FORMATS = ("fp32", "bf16", "int8", "int4")  # storage formats of --weights (plus "auto")
QUANT_FORMATS = ("bf16", "int8", "int4")  # the ones this module keeps
FMT_ID = {"bf16": 0, "int8": 1, "int4": 2}  # kernels.c's fmt argument
DEFAULT_GROUP = {"bf16": 32, "int8": 32, "int4": 32}
HEAD_FORMAT = {"bf16": "bf16", "int8": "int8", "int4": "int8"}  # the token embedding and output head
BLOCK = 32  # weights per kernel block: every stored row is a multiple of it
FUSED_ROWS = 64  # up to this many rows of x go to the fused kernel; more: dequantize + F.linear
GGUF_TYPES = {8: "Q8_0", 2: "Q4_0", 3: "Q4_1"}  # GGML type ids QuantWeight.from_gguf reads as stored


# --------------------------------------------------------------------------------------------- kernels
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def kernel_build() -> tuple[str | None, str]:
    """Which build of kernels.c this CPU runs: "avx512bf16" (x86 with AVX512-BF16: bf16 weights use the
    bf16 dot-product instruction), "avx2" (AVX2, FMA and F16C), or (None, why not).
    SCRATCHLLM_KERNELS=avx2 picks the AVX2 build where both would run (to compare them)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are x86 (AVX2) code and this CPU is {platform.machine()}"
    flags = cpu_flags()
    if flags is None:
        return None, "cannot read /proc/cpuinfo to check for AVX2/FMA/F16C"
    missing = {"avx2", "fma", "f16c"} - flags
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    native = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    return ("avx512bf16" if native and os.environ.get("SCRATCHLLM_KERNELS") != "avx2" else "avx2"), ""


BUILD_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"],
               "avx512bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]}


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: $SCRATCHLLM_CACHE/kernels (default ~/.cache/scratchllm/kernels)."""
    from scratchllm.io.download import cache_dir

    return cache_dir() / "kernels"


def _build(src: Path, build: str) -> Path:
    """kernels.c compiled into the cache (once per source, compiler and flags; atomic rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    flags = ["-O3", *BUILD_FLAGS[build], "-fopenmp", "-shared", "-fPIC"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, version, *flags]).encode()).hexdigest()[:16]
    out = kernel_cache_dir() / f"kernels-{build}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(src), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise OSError(f"{cc} failed: {run.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot run (a warning says why)."""
    global _LIB
    if _LIB is not False:
        return _LIB
    _LIB = None
    if os.environ.get("SCRATCHLLM_NO_KERNELS", "") not in ("", "0"):
        return None
    build, why = kernel_build()
    try:
        if build is None:
            raise OSError(why)
        lib = ctypes.CDLL(str(_build(Path(__file__).with_name("kernels.c"), build)))
    except OSError as e:
        warnings.warn(f"quantized weights run without their fused kernels ({e}): every matmul dequantizes "
                      "with torch ops, which is slower than fp32 weights", stacklevel=3)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qmatvec.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.qdequant.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.bf16dp = build == "avx512bf16"
    if lib.bf16dp:
        lib.qmatvec_bf16dp.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    _LIB = lib
    return lib


def bf16_inputs() -> bool:
    """True when bf16 weights multiply x rounded to bf16 (the AVX512-BF16 build), False when x stays fp32."""
    lib = kernels()
    return bool(lib is not None and lib.bf16dp)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------- weights
class QuantWeight:
    """An (N, K) weight matrix stored as `fmt` ("bf16", "int8", "int4"), rows padded to Kp (a multiple
    of group_size, itself a multiple of 32) with zeros. All tensors are integer typed (bf16 and fp16
    bits as int16), so module-wide dtype casts leave them alone:
        codes  bf16: int16 (N, Kp)   int8: int8 (N, Kp)   int4: uint8 (N, Kp / 2), two weights a byte
        d, m   fp16 bits (N, Kp / group_size): scale (int8, int4) and minimum (int4); None otherwise"""

    def __init__(self, fmt: str, codes: torch.Tensor, d, m, shape: tuple[int, int], group_size: int):
        self.fmt, self.codes, self.d, self.m = fmt, codes, d, m
        self.shape, self.group_size = (int(shape[0]), int(shape[1])), int(group_size)
        self.padded = codes.shape[1] * (2 if fmt == "int4" else 1)
        self.error: tuple[float, float] | None = None  # quantize(): (sum of squared errors, of squares)

    # ------------------------------------------------------------------ making one
    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str, group_size: int | None = None) -> QuantWeight:
        """Round-to-nearest quantization of a float matrix w (N, K), group-wise along K."""
        if fmt not in QUANT_FORMATS:
            raise ScratchError(f"unknown weight format {fmt!r}: choose one of {', '.join(QUANT_FORMATS)}")
        gs = DEFAULT_GROUP[fmt] if group_size is None else group_size
        if fmt == "bf16":
            gs = BLOCK  # no scales: the group only sets the padding
        if not isinstance(gs, int) or gs <= 0 or gs % BLOCK:
            raise ScratchError(f"group_size must be a positive multiple of {BLOCK}, got {gs!r}")
        w = w.detach().float()
        qw = cls._quantize(w, fmt, gs)
        err = qw._dequantize_torch()[:, :w.shape[1]] - w
        qw.error = (float(err.double().square().sum()), float(w.double().square().sum()))
        return qw

    @classmethod
    def _quantize(cls, w: torch.Tensor, fmt: str, gs: int) -> QuantWeight:
        N, K = w.shape
        Kp = -(-K // gs) * gs
        w = F.pad(w, (0, Kp - K))  # (N, Kp), zeros past K
        if fmt == "bf16":
            return cls(fmt, w.to(torch.bfloat16).view(torch.int16), None, None, (N, K), gs)
        g = w.view(N, Kp // gs, gs)  # (N, G, gs)
        if fmt == "int8":
            d = (g.abs().amax(-1) / 127).half()  # (N, G), fp16 as stored
            df = d.float()[..., None]
            q = torch.where(df > 0, (g / df.clamp_min(1e-30)).round(), 0).clamp(-127, 127)
            return cls(fmt, q.to(torch.int8).view(N, Kp), d.view(torch.int16), None, (N, K), gs)
        lo, hi = g.amin(-1), g.amax(-1)
        d, m = ((hi - lo) / 15).half(), lo.half()  # (N, G) each
        df, mf = d.float()[..., None], m.float()[..., None]
        q = torch.where(df > 0, ((g - mf) / df.clamp_min(1e-30)).round(), 0).clamp(0, 15).to(torch.uint8)
        return cls(fmt, pack_nibbles(q.view(N, Kp)), d.view(torch.int16), m.view(torch.int16), (N, K), gs)

    @classmethod
    def from_gguf(cls, raw, qtype: int, shape: tuple[int, int], name: str = "tensor") -> QuantWeight:
        """GGUF blocks of a (N, K) tensor (qtype Q8_0, Q4_0 or Q4_1; K a multiple of 32), as stored."""
        import numpy as np

        if qtype not in GGUF_TYPES:
            raise ScratchError(f"{name}: GGML type {qtype} is not one QuantWeight reads directly "
                               f"({', '.join(GGUF_TYPES.values())})")
        N, K = shape
        if K % BLOCK:
            raise ScratchError(f"{name}: rows of {K} weights are not whole blocks of {BLOCK}")
        kind = GGUF_TYPES[qtype]
        per_block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
        blocks = np.frombuffer(raw, dtype=np.uint8)
        if blocks.size != N * K // BLOCK * per_block:
            raise ScratchError(f"{name}: {blocks.size} bytes, expected {N * K // BLOCK * per_block} for "
                               f"{kind} {N}x{K}")
        blocks = torch.from_numpy(blocks.copy()).view(N, K // BLOCK, per_block)  # (N, G, bytes of a block)
        d = blocks[..., :2].contiguous().view(torch.int16)[..., 0]  # (N, G) fp16 bits
        if kind == "Q8_0":
            return cls("int8", blocks[..., 2:].contiguous().view(torch.int8).view(N, K), d, None, (N, K), BLOCK)
        if kind == "Q4_0":  # w = d * (q - 8) = d * q + (-8 d): Q4_1 with m = -8 d (exact in fp16)
            m = (d.view(torch.float16) * -8).view(torch.int16)
            codes = blocks[..., 2:]
        else:
            m = blocks[..., 2:4].contiguous().view(torch.int16)[..., 0]
            codes = blocks[..., 4:]
        return cls("int4", codes.contiguous().view(N, K // 2), d, m, (N, K), BLOCK)

    # ------------------------------------------------------------------ using one
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m) if t is not None)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 matrix (N, K), or only its rows `rows` (R,) -> (R, K)."""
        N, K = self.shape
        idx = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
        R = N if idx is None else idx.numel()
        if idx is not None and R and not (0 <= int(idx.min()) and int(idx.max()) < N):
            raise ScratchError(f"row ids must be in [0, {N}), got {int(idx.min())}..{int(idx.max())}")
        lib = kernels()
        if lib is None or R == 0:
            return self._dequantize_torch(idx)[:, :K]
        out = torch.empty(R, self.padded)
        lib.qdequant(FMT_ID[self.fmt], _ptr(self.codes), _ptr(self.d), _ptr(self.m), _ptr(idx), _ptr(out),
                     R, self.padded, self.group_size)
        return out[:, :K] if self.padded != K else out

    def _dequantize_torch(self, rows=None) -> torch.Tensor:
        """The same numbers with torch ops (no kernels): (R, Kp)."""
        def pick(t):
            return t if rows is None else t[rows.reshape(-1)]

        codes = pick(self.codes)
        if self.fmt == "bf16":
            return codes.view(torch.bfloat16).float()
        R, G = codes.shape[0], self.padded // self.group_size
        if R == 0:
            return torch.empty(0, self.padded)
        d = pick(self.d).view(torch.float16).float()[..., None]  # (R, G, 1)
        if self.fmt == "int8":
            return (codes.float().view(R, G, -1) * d).view(R, -1)
        q = unpack_nibbles(codes).float().view(R, G, -1)
        return (q * d + pick(self.m).view(torch.float16).float()[..., None]).view(R, -1)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, K) float32 -> x W^T + bias, (R, N) float32."""
        N, K = self.shape
        R = x.shape[0]
        lib = kernels()
        if lib is None or R > FUSED_ROWS:
            return F.linear(x, self.dequantize(), bias)
        if self.padded != K:
            x = F.pad(x, (0, self.padded - K))
        x = x.contiguous()
        y = torch.empty(R, N)
        if self.fmt == "bf16" and lib.bf16dp:
            xb = torch.empty(R, self.padded, dtype=torch.int16)  # x rounded to bf16, by the kernel
            lib.qmatvec_bf16dp(_ptr(self.codes), _ptr(x), _ptr(xb), _ptr(bias), _ptr(y), R, N, self.padded)
            return y
        lib.qmatvec(FMT_ID[self.fmt], _ptr(self.codes), _ptr(self.d), _ptr(self.m), _ptr(x),
                    _ptr(bias), _ptr(y), R, N, self.padded, self.group_size)
        return y

    def take_rows(self, idx: torch.Tensor) -> QuantWeight:
        """A QuantWeight of rows idx of this one (reordering rows, e.g. llama.cpp's Q/K permutation)."""
        def pick(t):
            return None if t is None else t[idx].contiguous()

        new = QuantWeight(self.fmt, pick(self.codes), pick(self.d), pick(self.m), (len(idx), self.shape[1]),
                          self.group_size)
        new.error = self.error
        return new

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Rows of several QuantWeights of one format, group size and width, stacked (q, k, v -> c_attn)."""
        first = parts[0]
        if any((p.fmt, p.group_size, p.shape[1]) != (first.fmt, first.group_size, first.shape[1]) for p in parts):
            raise ScratchError("cannot stack weights of different formats: " +
                               ", ".join(f"{p.fmt}/{p.group_size} {p.shape}" for p in parts))
        def stack(name):
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        new = QuantWeight(first.fmt, stack("codes"), stack("d"), stack("m"),
                          (sum(p.shape[0] for p in parts), first.shape[1]), first.group_size)
        if all(p.error is not None for p in parts):
            new.error = (sum(p.error[0] for p in parts), sum(p.error[1] for p in parts))
        return new

    def __repr__(self) -> str:
        return f"QuantWeight({self.fmt}, {self.shape[0]}x{self.shape[1]}, group {self.group_size})"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 (N, Kp) -> (N, Kp / 2) bytes: in each block of 32, byte j = q[j] | q[j + 16] << 4."""
    N, Kp = q.shape
    b = q.view(N, Kp // BLOCK, 2, BLOCK // 2)  # (N, blocks, low/high half, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, Kp // 2)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: (N, Kp / 2) bytes -> (N, Kp) uint8 values 0..15."""
    N = codes.shape[0]
    b = codes.view(N, -1, BLOCK // 2)  # (N, blocks, 16)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(N, -1)


# --------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """y = x W^T + b with W a QuantWeight; x of any float dtype (computed in fp32, returned as x's)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)  # registered so that memory reports and .to() see them
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ScratchError(f"QuantLinear expects inputs of {self.in_features} features, got {x.shape[-1]}")
        bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
        y = self.weight.matmul(x.reshape(-1, self.in_features).float(), bias)  # (R, N)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.weight.fmt}, group {self.weight.group_size}"


class QuantEmbedding(nn.Module):
    """Token embedding rows from a QuantWeight (dequantized on lookup), shared with a tied head."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(idx).view(*idx.shape, self.embedding_dim)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def weight_formats(model: nn.Module) -> dict[str, int]:
    """How many matrices of the model are in each format ("fp32"/"bf16" for plain modules): its Linear
    layers and token embedding (a position table, which quantize_model leaves in fp32, is not counted)."""
    counts: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            fmt = m.weight.fmt
        elif isinstance(m, nn.Linear) or (isinstance(m, nn.Embedding) and not name.endswith("wpe")):
            fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(m.weight.dtype, str(m.weight.dtype))
        else:
            continue
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def block_formats(model: nn.Module) -> set[str]:
    """Formats of the quantized matrices other than the token embedding and output head (the format a
    quantized model "is": an int4 model keeps its head in int8)."""
    return {m.weight.fmt for name, m in model.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"}


def weights_label(model: nn.Module) -> str:
    """The model's matrix formats joined, e.g. "int4+int8" for SmolLM2's Q4_1 GGUF read as stored."""
    return "+".join(sorted(weight_formats(model)))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight as stored (parameters, and quantized weights once each)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.nbytes
    params = {id(p): p for p in model.parameters()}
    return total + sum(p.numel() * p.element_size() for p in params.values())


def quantize_model(model: nn.Module, fmt: str, group_size: int | None = None, head: str | None = None) -> nn.Module:
    """Replace, in place, the nn.Linear modules of a GPT and its token embedding (wte) by QuantLinear /
    QuantEmbedding in format `fmt` (the embedding and lm_head in `head`, default HEAD_FORMAT[fmt]); a
    tied head and embedding share one QuantWeight. The rest of the model is cast to fp32. Returns it."""
    if fmt not in QUANT_FORMATS:
        raise ScratchError(f"unknown weight format {fmt!r}: choose one of {', '.join(QUANT_FORMATS)}")
    head = HEAD_FORMAT[fmt] if head is None else head
    if head not in QUANT_FORMATS:
        raise ScratchError(f"unknown weight format {head!r} for the head: choose one of {', '.join(QUANT_FORMATS)}")
    if is_quantized(model):
        raise ScratchError(f"the model is already quantized ({weight_formats(model)})")
    if next(model.parameters()).device.type != "cpu":
        raise ScratchError(f"{fmt} weights run on the CPU only; on a GPU use --weights fp32 or bf16")
    shared: dict[int, QuantWeight] = {}

    def qweight(w: torch.Tensor, in_format: str) -> QuantWeight:
        if id(w) not in shared:
            shared[id(w)] = QuantWeight.quantize(w, in_format, group_size if in_format == fmt else None)
        return shared[id(w)]

    with torch.no_grad():
        wte = getattr(getattr(model, "transformer", None), "wte", None)
        if isinstance(wte, nn.Embedding):
            model.transformer.wte = QuantEmbedding(qweight(wte.weight, head))
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    is_head = module is model and child_name == "lm_head"
                    setattr(module, child_name, QuantLinear(qweight(child.weight, head if is_head else fmt),
                                                            child.bias))
                elif isinstance(child, nn.Linear) or "lora" in type(child).__name__.lower():
                    raise ScratchError(f"{name + '.' if name else ''}{child_name} is a {type(child).__name__}: "
                                       "merge adapters into the weights before quantizing")
    return model.float()


def quantized_copy(model: nn.Module, fmt: str, group_size: int | None = None, head: str | None = None) -> nn.Module:
    """quantize_model on a structural copy: the original model is left as it is. The copy shares the
    original's fp32 tensors that stay (norms, position embeddings); others are copied to fp32."""
    import copy

    memo: dict[int, nn.Parameter] = {}

    def param(p):
        if p is None or p.dtype == torch.float32:
            return p
        if id(p) not in memo:  # tied parameters stay tied in the copy
            memo[id(p)] = nn.Parameter(p.detach().float(), requires_grad=False)
        return memo[id(p)]

    def structural(m: nn.Module) -> nn.Module:
        new = copy.copy(m)
        new._parameters = {k: param(p) for k, p in m._parameters.items()}
        new._buffers = {k: None if b is None else b.float() if b.is_floating_point() else b
                        for k, b in m._buffers.items()}
        new._modules = {k: None if c is None else structural(c) for k, c in m._modules.items()}
        return new

    return quantize_model(structural(model), fmt, group_size, head)


def resolve_weights(weights: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The storage format `weights` (auto or one of FORMATS) means for a model of `dtype` on `device`:
    auto = bf16 on CPUs that can run the kernels (greedy output equal to fp32's as a rule, half the
    bytes), else the model's own dtype; int8/int4 refuse GPUs."""
    device = torch.device(device)
    if weights not in ("auto", *FORMATS):
        raise ScratchError(f"unknown --weights {weights!r}: choose auto, {', '.join(FORMATS)}")
    own = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    if device.type != "cpu":
        if weights in ("int8", "int4"):
            raise ScratchError(f"--weights {weights} runs on the CPU only (its kernels are x86 code); on "
                               f"{device.type} use --weights bf16 or fp32")
        return own if weights == "auto" else weights
    if weights == "auto":
        return "bf16" if kernels() is not None else own
    return weights

