"""model/heads.py, the pure model side of classification fine-tuning: `last_real_index` on right, left
and two-sided padding; a padded batch classified as each row alone (last-token and mean pooling, the
plain causal path of right padding and the mask path of left padding, GPT-2 and Llama-style
switches); and `set_trainable`: exactly which parameters train in each mode (hand-counted), that frozen
ones get no gradient and no optimizer state, and that nothing below the first trainable layer is part
of the backward graph."""

import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.heads import SequenceClassifier, last_real_index, pool_hidden, set_trainable
from scratchllm.model.lora import lora_modules
from scratchllm.train.optim import build_optimizer

TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
LLAMA_STYLE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=1, bias=False)
LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}
LENGTHS = [7, 3, 5, 1]
PAD_ID = 63


def classifier(pool="last", num_classes=3, seed=0, **switches) -> SequenceClassifier:
    """A 2-block, 16-wide GPT under a 3-class head; weights enlarged so position or mask mistakes show."""
    torch.manual_seed(seed)
    clf = SequenceClassifier(GPT(ModelConfig(**TINY, **switches)), num_classes, pool).eval()
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return clf


def rows_and_batch(side: str, seed: int = 0):
    """Token rows of LENGTHS and their padded batch: (rows, idx (B, T), mask (B, T))."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, PAD_ID, (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    idx, mask = torch.full((len(rows), T), PAD_ID), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        idx[b, cols], mask[b, cols] = r, 1
    return rows, idx, mask


# --------------------------------------------------------------------------------------------- pooling
def test_last_real_index_right_left_and_both_sides():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    both = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]])
    assert last_real_index(right).tolist() == [2, 0, 3]
    assert last_real_index(left).tolist() == [3, 3, 3]
    assert last_real_index(both).tolist() == [2, 2, 1]


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_a_bool_attention_mask_works_like_an_int_one(side):
    clf = classifier("last")
    _, idx, mask = rows_and_batch(side)
    torch.testing.assert_close(clf(idx, attention_mask=mask.bool()), clf(idx, attention_mask=mask),
                               rtol=0, atol=0)


def test_pool_hidden_by_hand():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B=2, T=3, C=2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert pool_hidden(h, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool_hidden(h, mask, "mean").tolist() == [[1.0, 2.0], [9.0, 10.0]]  # (h0 + h1) / 2, (h4 + h5) / 2
    assert pool_hidden(h, None, "last").tolist() == [[4.0, 5.0], [10.0, 11.0]]
    assert pool_hidden(h, None, "mean").tolist() == [[2.0, 3.0], [8.0, 9.0]]


@pytest.mark.parametrize("switches", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pool", ["last", "mean"])
@torch.no_grad()
def test_padded_batch_classifies_each_row_as_alone(pool, side, switches):
    """Right padding takes the plain causal path, left padding the mask path: both must give each row
    the logits it gets unpadded (fp32, 1e-5)."""
    clf = classifier(pool, **switches)
    rows, idx, mask = rows_and_batch(side)
    batched = clf(idx, attention_mask=mask)  # (B, 3)
    alone = torch.cat([clf(r[None]) for r in rows])  # (B, 3), no padding at all
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    other_pad = torch.where(mask.bool(), idx, torch.zeros_like(idx))  # what the padding holds does not matter
    torch.testing.assert_close(clf(other_pad, attention_mask=mask), alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_padding_on_both_sides_uses_the_mask():
    clf = classifier("last")
    rows, _, _ = rows_and_batch("right")
    T = 9
    idx, mask = torch.full((len(rows), T), PAD_ID), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, 1:1 + len(r)], mask[b, 1:1 + len(r)] = r, 1  # one pad before, the rest after
    torch.testing.assert_close(clf(idx, attention_mask=mask), torch.cat([clf(r[None]) for r in rows]),
                               rtol=0, atol=1e-5)


def test_classifier_arguments_are_checked():
    backbone = GPT(ModelConfig(**TINY))
    with pytest.raises(ScratchError, match="pool 'max': expected one of last, mean"):
        SequenceClassifier(backbone, 2, pool="max")
    with pytest.raises(ScratchError, match=r"2 to 65536 classes \(1: a scalar score\), got 0"):
        SequenceClassifier(backbone, 0)
    assert SequenceClassifier(backbone, 1)(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 1)  # a reward model
    with pytest.raises(ScratchError, match="got 65537"):
        SequenceClassifier(backbone, 2**16 + 1)


# --------------------------------------------------------------------------------------------- what trains
def trainable(clf) -> set[str]:
    return {n for n, p in clf.named_parameters() if p.requires_grad}


def n_trainable(clf) -> int:
    return sum(p.numel() for p in clf.parameters() if p.requires_grad)


def block_names(clf, i: int) -> set[str]:
    return {f"backbone.transformer.h.{i}.{n}" for n, _ in clf.backbone.transformer.h[i].named_parameters()}


HEAD = {"head.weight", "head.bias"}
LN_F = {"backbone.transformer.ln_f.weight", "backbone.transformer.ln_f.bias"}


def test_head_mode_trains_the_head_only():
    """head = Linear(16, 3): 16 * 3 + 3 = 51 parameters."""
    clf = set_trainable(classifier(), "head")
    assert trainable(clf) == HEAD and n_trainable(clf) == 51


def test_last_block_mode_trains_the_last_blocks_the_final_norm_and_the_head():
    """For C = n_embd = 16, one GPT-2 block holds ln_1 2C = 32, c_attn 3C^2 + 3C = 816, attn.c_proj
    C^2 + C = 272, ln_2 32, mlp.c_fc 4C^2 + 4C = 1088 and mlp.c_proj 4C^2 + C = 1040: 3280. ln_f holds
    2C = 32 and the head 51, so n_blocks=1 trains 3280 + 32 + 51 = 3363 parameters, n_blocks=2 6643."""
    clf = set_trainable(classifier(), "last-block", n_blocks=1)
    assert trainable(clf) == block_names(clf, 1) | LN_F | HEAD
    assert n_trainable(clf) == 3363
    clf = set_trainable(classifier(), "last-block", n_blocks=2)
    assert trainable(clf) == block_names(clf, 0) | block_names(clf, 1) | LN_F | HEAD
    assert n_trainable(clf) == 6643
    for n in (0, 3):
        with pytest.raises(ScratchError, match=f"--train-blocks {n}: the model has 2 blocks"):
            set_trainable(classifier(), "last-block", n_blocks=n)


def test_all_mode_trains_everything_but_an_untied_lm_head():
    """Tied: wte (64 x 16 = 1024, also the lm_head), wpe 16 x 16 = 256, 2 blocks of 3280, ln_f 32 and the
    head 51: 7923. Untied, the lm_head (64 x 16) stays frozen: a classifier never uses it."""
    clf = set_trainable(classifier(), "all")
    assert trainable(clf) == {n for n, _ in clf.named_parameters()} and n_trainable(clf) == 7923
    untied = set_trainable(classifier(tie_embeddings=False), "all")
    assert trainable(untied) == {n for n, _ in untied.named_parameters()} - {"backbone.lm_head.weight"}
    assert n_trainable(untied) == 7923


def test_lora_mode_trains_the_adapters_and_the_head():
    """Rank 2 on c_attn (16 -> 48), attn.c_proj (16 -> 16), mlp.c_fc (16 -> 64) and mlp.c_proj (64 -> 16):
    2 * (64 + 32 + 80 + 80) = 512 per block, 1024 for two, plus the head's 51: 1075."""
    clf = set_trainable(classifier(), "lora", lora=LORA)
    names = trainable(clf)
    assert names - HEAD == {n for n in names if n.rpartition(".")[2] in ("lora_A", "lora_B")}
    assert len(lora_modules(clf)) == 8 and HEAD <= names and n_trainable(clf) == 1075
    with pytest.raises(ScratchError, match="--train lora needs the LoRA settings"):
        set_trainable(classifier(), "lora")


def test_unknown_mode():
    with pytest.raises(ScratchError, match="--train 'everything': expected one of head, last-block, all, lora"):
        set_trainable(classifier(), "everything")


MODES = [("head", {}), ("last-block", {"n_blocks": 1}), ("all", {}), ("lora", {"lora": LORA})]


@pytest.mark.parametrize("mode, kwargs", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(mode, kwargs, tie):
    clf = set_trainable(classifier(tie_embeddings=tie).train(), mode, **kwargs)
    rows, idx, mask = rows_and_batch("left")
    opt = build_optimizer(clf, lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    loss = torch.nn.functional.cross_entropy(clf(idx, attention_mask=mask), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for n, p in clf.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} trains but got no gradient"
            assert n.endswith("lora_A") or p.grad.abs().sum() > 0, n  # lora_A's gradient is 0 while B = 0
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    opt.step()
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    with_state = {id(p) for p in opt.state}
    for n, p in clf.named_parameters():
        assert (id(p) in in_optimizer) == p.requires_grad == (id(p) in with_state), n
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("mode, kwargs, block0_grad", [("head", {}, False), ("last-block", {"n_blocks": 1}, False),
                                                       ("last-block", {"n_blocks": 2}, True), ("all", {}, True),
                                                       ("lora", {"lora": LORA}, True)])
def test_no_backward_pass_below_the_first_trainable_layer(mode, kwargs, block0_grad):
    """A forward hook records whether each block's output is part of the autograd graph: below the first
    trainable layer it must not be (autograd then does no backward work there)."""
    clf = set_trainable(classifier().train(), mode, **kwargs)
    seen = {}
    for i, block in enumerate(clf.backbone.transformer.h):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out.requires_grad))
    _, idx, mask = rows_and_batch("right")
    logits = clf(idx, attention_mask=mask)
    assert seen == {0: block0_grad, 1: mode != "head"}
    assert logits.requires_grad  # the head always trains
