"""CPU decode speed-up: a copy of a model whose Linear weights are pre-packed for oneDNN.

What it does: decoding one token multiplies a single row by every weight matrix, so it is bound by how
fast the weights stream from memory. On CPUs, `F.linear` re-lays out bf16 weights for oneDNN on every
call; packing them once (the same thing `torch.compile` does with `freezing=True`, without the compile
time) made bf16 decoding of GPT-2 124M about 1.3x faster on this project's dev box (fp32 was about
1.2x slower, so the Engine packs bf16 models only; docs/benchmarks.md). `packed_copy(model)` returns
a structural copy of the model in which every plain `nn.Linear` is a `PackedLinear` (same math, bias
included); all other modules and parameters are shared with the original, which is left untouched.
What it does not do: training (the packed weights are a snapshot: re-pack after changing the model),
GPUs (there cuBLAS needs no packing), or quantization (numbers are the dtype's, as with F.linear).

    fast = packed_copy(model) if can_pack(model) else model
    logits = fast(idx)                    # same logits as model(idx), up to kernel rounding
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def can_pack(model: nn.Module) -> bool:
    """True when the model's weights are on the CPU in fp32 or bf16 and this torch has oneDNN
    (mkldnn) linear kernels (bf16 also needs hardware support: AVX512-BF16/AMX or AVX512)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if p.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return p.dtype == torch.float32


class PackedLinear(nn.Module):
    """y = x W^T + b, with W stored in oneDNN's blocked layout (packed once, at construction)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # layout tuned for 1-row inputs
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in_features) -> (..., out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packed_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with every plain nn.Linear replaced by a PackedLinear; everything else
    (embeddings, norms, config, methods) is shared with the original, which is not modified."""
    if type(module) is nn.Linear:
        return PackedLinear(module)
    new = copy.copy(module)  # shallow: shares parameters and buffers
    new._modules = {name: None if child is None else packed_copy(child) for name, child in module._modules.items()}
    return new
