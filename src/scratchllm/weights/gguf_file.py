"""llama.cpp's GGUF file format, read: header, metadata, tensor index, and tensors dequantized to fp32.

What it does:
- `read_gguf(path)` parses a GGUF file (v2/v3, little-endian) with our own reader: metadata as plain
  Python values, a `GGUFTensor` per tensor (type, shape in torch order, byte range), the file mapped
  into memory; every tensor's byte range is checked against the file size before anything is read.
- `dequantize(data, qtype, shape)`: raw bytes -> float32, our numpy code for F32, F16, BF16, F64, Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1 (layouts below); other types that the `gguf` package implements (K-quants
  Q2_K..Q6_K, IQ*, TQ*, MXFP4) go to `gguf.quants.dequantize` (`pip install 'scratchllm[gguf]'`).
- `type_info(qtype)`: a GGML type id's name and block size.
What it does not do: write GGUF, know what the tensors mean (which architecture, which parameter of
our GPT: gguf.py does that), or keep weights quantized.

GGUF lists dims innermost first: an nn.Linear weight (out, in) is stored as [in, out], each row cut
into blocks of 32 weights. Block layouts (d, m: fp16 scale and minimum; lo/hi: low/high 4 bits):
    Q8_0  d | qs int8[32]             w[j] = d * qs[j]
    Q4_0  d | qs u8[16]               w[j] = d * (lo(qs[j]) - 8)     w[j+16] = d * (hi(qs[j]) - 8)
    Q4_1  d | m | qs u8[16]           w[j] = d * lo(qs[j]) + m       w[j+16] = d * hi(qs[j]) + m
    Q5_0  d | qh u32 | qs u8[16]      as Q4_0, bit j of qh the 5th bit of weight j, minus 16 (not 8)
    Q5_1  d | m | qh u32 | qs u8[16]  as Q4_1, bit j of qh the 5th bit of weight j

    f = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    f.metadata["general.architecture"]                      # 'llama'
    t = f.tensors["blk.0.attn_q.weight"]
    w = dequantize(f.raw(t), t.qtype, t.shape, t.name)      # (576, 576) float32
    f.close()
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchllm.common import ScratchError

GGUF_INSTALL = "pip install 'scratchllm[gguf]'"
# GGUF metadata value type -> struct format (also a numpy dtype after "<"); 8 = string, 9 = array
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, UINT32, UINT64, FLOAT32 = 8, 9, 4, 10, 6
# GGML tensor type id -> (name, weights per block, bytes per block) for the types we decode ourselves
OUR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 28: ("F64", 1, 8), 8: ("Q8_0", 32, 34),
             2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24)}


# --------------------------------------------------------------------------------------------- reading
@dataclass
class GGUFTensor:
    name: str
    qtype: int  # GGML type id (0 = F32, 2 = Q4_0, 8 = Q8_0, 12 = Q4_K, ...)
    type_name: str
    shape: tuple[int, ...]  # torch order: (out, in) for a Linear weight, the reverse of GGUF's dims
    offset: int  # first byte in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict = field(repr=False)  # {key: str | int | float | bool | list}
    tensors: dict[str, GGUFTensor] = field(repr=False)  # in file order
    size: int = 0  # bytes
    buf: mmap.mmap | bytes = field(default=b"", repr=False)

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """The bytes of tensor `t`, a uint8 view of the mapped file (nothing is copied)."""
        return np.frombuffer(self.buf, np.uint8, t.nbytes, t.offset)

    def close(self) -> None:
        """Unmap the file (left to the garbage collector while views of it are alive)."""
        try:
            self.buf.close()
        except (BufferError, AttributeError):  # views still alive / an empty file's b""
            pass


def _need_gguf(what: str):
    try:
        import gguf
    except ImportError:
        raise ScratchError(f"{what} needs the gguf package: {GGUF_INSTALL}") from None
    return gguf


def type_info(qtype: int, name: str = "tensor") -> tuple[str, int, int]:
    """(type name, weights per block, bytes per block) of a GGML type id (types not ours: from gguf).

    >>> type_info(3)
    ('Q4_1', 32, 20)
    """
    if qtype in OUR_TYPES:
        return OUR_TYPES[qtype]
    ours = ", ".join(n for n, _, _ in OUR_TYPES.values())
    gguf = _need_gguf(f"{name}: tensor type id {qtype} (not one of {ours})")
    try:
        t = gguf.GGMLQuantizationType(qtype)
    except ValueError:
        raise ScratchError(f"{name}: unknown tensor type id {qtype} (a corrupt file, or a type newer than "
                           f"the gguf package {getattr(gguf, '__version__', '')})") from None
    return (t.name, *gguf.GGML_QUANT_SIZES[t])


class _Cursor:
    """Reads little-endian GGUF values from the mapped file; a short read names the field and byte."""

    def __init__(self, buf, path: Path, pos: int):
        self.buf, self.path, self.pos = buf, path, pos

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise ScratchError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                               f"but the file ends at byte {len(self.buf)} (an incomplete download or copy?)")

    def scalar(self, vtype: int, what: str):
        fmt = "<" + VALUE_FORMATS[vtype]
        self.need(struct.calcsize(fmt), what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return float(str(np.float32(value))) if vtype == FLOAT32 else value  # 1e-05, not 9.99999974e-06

    def string(self, what: str) -> str:
        n = self.scalar(UINT64, what)
        self.need(n, what)
        raw, self.pos = self.buf[self.pos:self.pos + n], self.pos + n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ScratchError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str):
        if vtype == STRING:
            return self.string(what)
        if vtype in VALUE_FORMATS:
            return self.scalar(vtype, what)
        if vtype != ARRAY:
            raise ScratchError(f"{self.path}: {what} has unknown value type {vtype} (a corrupt file?)")
        etype, count = self.scalar(UINT32, what), self.scalar(UINT64, what)
        if etype not in VALUE_FORMATS:  # strings or arrays: each takes at least 8 bytes
            self.need(count * 8, what)
            return [self.value(etype, what) for _ in range(count)]
        dtype = np.dtype("<" + VALUE_FORMATS[etype])  # numbers: one numpy read
        self.need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values


def _map(path: Path):
    """(the file mapped read-only, its size); b"" for an empty file."""
    if not path.is_file():
        raise ScratchError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, not a GGUF file")
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            return (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""), size
    except OSError as e:
        raise ScratchError(f"cannot read {path}: {e.strerror or e}") from None


def read_gguf(path) -> GGUFFile:
    """Parse the GGUF file `path`: header, metadata and tensor index (the data stays in the mapped file)."""
    path = Path(path)
    buf, size = _map(path)
    if buf[:4] != b"GGUF":
        raise ScratchError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    cur = _Cursor(buf, path, 4)
    version = cur.scalar(UINT32, "the version")
    if version not in (2, 3):
        what = "a big-endian GGUF file" if version and not version & 0xFFFF else f"GGUF version {version}"
        raise ScratchError(f"{path}: {what} is not supported (versions 2 and 3, little-endian, are); "
                           "convert it again with a recent llama.cpp")
    n_tensors, n_kv = cur.scalar(UINT64, "the tensor count"), cur.scalar(UINT64, "the metadata count")
    cur.need(n_kv * 13 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor infos")
    meta = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in meta:
            raise ScratchError(f"{path}: metadata key {key!r} appears twice (a corrupt file?)")
        meta[key] = cur.value(cur.scalar(UINT32, key), f"metadata {key!r}")
    infos = []  # (name, GGUF dims, type id, offset from the start of the data)
    for _ in range(n_tensors):
        name, n_dims = cur.string("a tensor name"), cur.scalar(UINT32, "a tensor's dims")
        if n_dims > 4:  # GGML_MAX_DIMS
            raise ScratchError(f"{path}: tensor {name} has {n_dims} dims, at most 4 are allowed (a corrupt file?)")
        dims = [cur.scalar(UINT64, name) for _ in range(n_dims)]
        infos.append((name, dims, cur.scalar(UINT32, name), cur.scalar(UINT64, name)))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ScratchError(f"{path}: general.alignment must be a power of two, got {align!r}")
    tensors = _tensor_index(path, infos, -(-cur.pos // align) * align, align)  # data: at the next multiple
    short = [t for t in tensors.values() if t.offset + t.nbytes > size]
    if short:
        raise ScratchError(f"{path}: short tensor data: {len(short)} of {len(tensors)} tensors end past the "
                           f"end of the file ({size} bytes), the first {short[0].name} at bytes {short[0].offset}.."
                           f"{short[0].offset + short[0].nbytes} (a truncated download?)")
    return GGUFFile(path, version, meta, tensors, size, buf)


def _tensor_index(path: Path, infos: list, start: int, align: int) -> dict[str, GGUFTensor]:
    """{name: GGUFTensor} of the (name, dims, type id, offset) infos, data starting at byte `start`."""
    tensors = {}
    for name, dims, qtype, offset in infos:
        type_name, block, block_bytes = type_info(qtype, name)
        why = "appears twice" if name in tensors else "has no dims" if not dims else \
            f"has offset {offset}, not a multiple of {align}" if offset % align else \
            f"has rows of {dims[0]}, not whole {type_name} blocks of {block}" if dims[0] % block else None
        if why:
            raise ScratchError(f"{path}: tensor {name} {why} (a corrupt file?)")
        tensors[name] = GGUFTensor(name, qtype, type_name, tuple(reversed(dims)), start + offset,
                                   math.prod(dims) // block * block_bytes)
    return tensors


# --------------------------------------------------------------------------------------------- dequantize
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes per 32 weights
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18
Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 20
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])  # 22
Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])  # 24


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) 4-bit values: the low halves are weights 0..15, the high ones 16..31.

    >>> _nibbles(np.array([[0x21] * 16], np.uint8))[0, [0, 16]].tolist()
    [1, 2]
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n,) uint32 -> (n, 32) uint8: bit j of qh, as 16 or 0, is the 5th bit of weight j.

    >>> _fifth_bits(np.array([0b101], np.uint32))[0, :3].tolist()
    [16, 0, 16]
    """
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4  # (n, 32)


def _scale(blocks: np.ndarray, key: str = "d") -> np.ndarray:
    return blocks[key].astype(np.float32)[:, None]  # (n, 1), broadcasts over a block's 32 weights


def _q5(b: np.ndarray) -> np.ndarray:
    return (_nibbles(b["qs"]) | _fifth_bits(b["qh"])).astype(np.float32)  # (n, 32) values 0..31


DECODERS = {  # GGML type id -> raw uint8 bytes -> float32, flat or (n_blocks, 32); same math as gguf's
    0: lambda raw: raw.view("<f4").copy(),
    1: lambda raw: raw.view("<f2").astype(np.float32),
    28: lambda raw: raw.view("<f8").astype(np.float32),
    30: lambda raw: (raw.view("<u2").astype(np.uint32) << 16).view(np.float32),  # bf16: fp32's top half
    8: lambda raw: (b := raw.view(Q8_0))["qs"].astype(np.float32) * _scale(b),
    2: lambda raw: _scale(b := raw.view(Q4_0)) * (_nibbles(b["qs"]).astype(np.float32) - 8),
    3: lambda raw: _scale(b := raw.view(Q4_1)) * _nibbles(b["qs"]).astype(np.float32) + _scale(b, "m"),
    6: lambda raw: _scale(b := raw.view(Q5_0)) * (_q5(b) - 16),
    7: lambda raw: _scale(b := raw.view(Q5_1)) * _q5(b) + _scale(b, "m"),
}


def dequantize(data, qtype: int, shape, name: str = "tensor") -> torch.Tensor:
    """float32 tensor of `shape` (torch order) from the raw bytes `data` (bytes or an array) of GGML
    type id `qtype`; `name` (the tensor's) is for error messages.

    >>> dequantize(np.array([0, 60, 0, 188], np.uint8), 1, (2,))   # two fp16: 1.0 and -1.0
    tensor([ 1., -1.])
    """
    type_name, block, block_bytes = type_info(qtype, name)
    raw = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    shape = tuple(int(s) for s in shape)
    want = math.prod(shape) // block * block_bytes
    if not shape or shape[-1] % block or raw.size != want:
        raise ScratchError(f"{name}: {raw.size} bytes of {type_name} do not hold a tensor of shape {shape} "
                           f"(rows must be multiples of {block} weights; that shape takes {want} bytes)")
    if qtype in DECODERS:
        with np.errstate(all="ignore"):  # a corrupt scale (inf, nan) is caught by load_gguf_model
            return torch.from_numpy(DECODERS[qtype](raw).reshape(shape))
    gguf = _need_gguf(f"{name}: dequantizing {type_name}")
    try:
        rows = raw.reshape(-1, shape[-1] // block * block_bytes)  # (rows, bytes per row)
        return torch.from_numpy(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(qtype)).reshape(shape))
    except NotImplementedError:
        raise ScratchError(f"{name}: tensor type {type_name} cannot be dequantized (neither scratchllm nor "
                           "the gguf package implements it); use a file quantized to Q8_0, Q4_K_M, F16...") from None
