"""Fused lm_head + cross-entropy, chunked over rows, that never holds the full (N, vocab) logits.

What it does: `linear_cross_entropy(x, weight, targets)` equals
`F.cross_entropy(x @ weight.T, targets, ignore_index=IGNORE_INDEX)` (mean, sum or none), computed
`chunk_rows` rows at a time. For "mean" and "sum", each chunk's gradient is formed right away in the
forward pass from the softmax: d loss / d logits = softmax(logits) - onehot(target) (zero on ignored
rows), so the backward pass is two stored tensors times the incoming scalar gradient. That saves the
fp32 copy of the logits, the separate log-softmax backward and most of the memory (a GPT-2 sized
vocabulary makes the logits the largest activation by far). For "none" (the per-row loss
-log p(target), e.g. per-token log-probs for DPO or PPO) the upstream gradient differs per row and is
only known in the backward pass, so the backward recomputes each chunk's logits (one extra matmul).
What it does not do: return logits (the model returns None for them when it uses this path).

    loss = linear_cross_entropy(h.view(-1, C), model.lm_head.weight, targets.view(-1))
    nll = linear_cross_entropy(h.view(-1, C), model.lm_head.weight, targets.view(-1), reduction="none")
    logp = -nll.view(B, T)                       # log p(target) per token, 0 where ignored
"""

from __future__ import annotations

import torch

from scratchllm.common import IGNORE_INDEX, ScratchError

REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for x (bf16 under bf16 autocast), else x's own dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _lse_and_grad(logits: torch.Tensor, t: torch.Tensor, row_scale: torch.Tensor, need_grad: bool):
    """logsumexp of each row of the fp32 logits (n, V), and when asked the gradient of the loss with
    respect to them, (softmax - onehot(t)) * row_scale. Eager mode reuses the logits' memory (they are
    overwritten) and makes no other (n, V) tensor; under torch.compile it is one fused expression."""
    if torch.compiler.is_compiling():
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        if not need_grad:
            return lse, None
        onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == t  # (n, V)
        return lse, (torch.exp(logits - lse[:, None]) - onehot.float()) * row_scale
    m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    e = logits.sub_(m).exp_()  # (n, V) exp(logit - max), in place
    total = e.sum(dim=-1, keepdim=True)  # (n, 1)
    lse = (m + total.log())[:, 0]  # (n,)
    if not need_grad:
        return lse, None
    return lse, e.mul_(row_scale / total).scatter_add_(1, t, -row_scale)  # softmax * s - onehot * s


def _chunked(x, weight, targets, dtype, chunk_rows, row_weight=None, grad_weight: bool = True):
    """The per-row loss (N,) of the logits x @ weight.T, 0 on ignored rows, chunk by chunk; with
    row_weight (N,) fp32 also the gradients of sum(row_weight * loss) with respect to x and (unless
    grad_weight is False: a frozen output layer, as under LoRA) weight (row_weight must be 0 on ignored
    rows)."""
    N = x.shape[0]
    need_grad = row_weight is not None
    xc, wc = x.to(dtype), weight.to(dtype)  # (N, C), (V, C) in the matmul dtype
    per_row = torch.empty(N, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad and grad_weight else None
    for s in range(0, N, chunk_rows):
        rows = slice(s, min(s + chunk_rows, N))
        t = targets[rows].clamp(min=0)[:, None]  # (n, 1), ignored rows point at class 0
        logits = (xc[rows] @ wc.T).float()  # (n, V)
        target_logit = logits.gather(1, t)[:, 0]  # (n,), read before the logits are overwritten
        lse, g = _lse_and_grad(logits, t, row_weight[rows, None] if need_grad else None, need_grad)
        per_row[rows] = lse - target_logit
        if need_grad:
            g = g.to(dtype)  # (n, V) d loss / d logits
            grad_x[rows] = (g @ wc).to(x.dtype)  # (n, C)
            if grad_w is None:
                continue
            if dtype == torch.float32:
                torch.addmm(grad_w, g.T, xc[rows], out=grad_w)  # (V, C), accumulated in place
            else:
                grad_w += g.T @ xc[rows]  # (V, C): bf16 product, fp32 sum over chunks
    per_row = torch.where(targets != IGNORE_INDEX, per_row, 0.0)  # (N,)
    return per_row, grad_x, grad_w.to(weight.dtype) if grad_w is not None else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, reduction, chunk_rows, dtype, need_grad):
        ctx.reduction, ctx.chunk_rows, ctx.dtype = reduction, chunk_rows, dtype
        if reduction == "none":
            # the upstream gradient is per row and arrives in backward: keep the inputs, recompute there
            per_row, _, _ = _chunked(x, weight, targets, dtype, chunk_rows)
            if need_grad:
                ctx.save_for_backward(x, weight, targets)
            return per_row  # (N,)
        valid = targets != IGNORE_INDEX  # (N,)
        n_valid = valid.sum()
        scale = 1.0 / n_valid.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=x.device)
        row_weight = valid.float() * scale if need_grad else None  # (N,): d loss / d per-row loss
        per_row, grad_x, grad_w = _chunked(x, weight, targets, dtype, chunk_rows, row_weight, ctx.needs_input_grad[1])
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
        loss = per_row.sum()
        if reduction == "mean":
            loss = loss / n_valid.float()  # NaN when every target is ignored, like F.cross_entropy
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            x, weight, targets = ctx.saved_tensors
            row_weight = grad_loss.float() * (targets != IGNORE_INDEX)  # (N,) upstream gradient per row
            with torch.autocast(x.device.type, enabled=False):
                _, grad_x, grad_w = _chunked(x, weight, targets, ctx.dtype, ctx.chunk_rows, row_weight,
                                             ctx.needs_input_grad[1])
            return grad_x, grad_w, None, None, None, None, None
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk_rows: int = 1024) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T (x (N, C), weight (V, C), targets (N,)) without
    materialising them; rows whose target is IGNORE_INDEX are skipped. reduction "mean" / "sum" give a
    scalar; "none" gives the per-row loss (N,) fp32, -log softmax(x @ weight.T)[target], 0.0 on
    ignored rows.

        x (3, C), targets [2, -100, 0], reduction="none" -> [-log p_0(2), 0.0, -log p_2(0)]
    """
    if reduction not in REDUCTIONS:
        raise ScratchError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    dtype = _compute_dtype(x)
    keep = None
    if not torch.compiler.is_compiling():  # (a data-dependent shape: compiled graphs keep every row)
        valid = targets != IGNORE_INDEX  # (N,)
        if not bool(valid.all()):  # SFT masks most prompt tokens: their vocab-sized matmuls are skipped
            keep = valid.nonzero()[:, 0]  # (n,)
            x, targets = x.index_select(0, keep), targets.index_select(0, keep)  # (n, C), (n,)
    with torch.autocast(x.device.type, enabled=False):
        loss = _LinearCrossEntropy.apply(x, weight, targets, reduction, chunk_rows, dtype, need_grad)
    if keep is not None and reduction == "none":  # back to one value per input row, 0.0 where ignored
        loss = loss.new_zeros(valid.shape[0]).index_copy(0, keep, loss)
    return loss
