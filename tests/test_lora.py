"""LoRA tests (model/lora.py): a fresh adapter changes nothing and a trained one adds scaling * B A x
(checked by hand); apply_lora's freezing, name patterns and errors; the trainable count derived by
hand; merge_lora keeps the logits and gives plain nn.Linear modules back (a tied lm_head gets its own
weight); disable_lora gives the base model; adapters-only state dicts and gradients; and equality with
HF's peft (the reference) on tiny random GPT-2 and Llama models loaded through load_hf_model."""

import pytest
import torch
import torch.nn as nn

from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    count_lora_parameters,
    disable_lora,
    lora_settings,
    lora_state_dict,
    merge_lora,
)

GPT2_TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
LLAMA_TINY = dict(GPT2_TINY, norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=1, bias=False)


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**GPT2_TINY, **overrides})).eval()


def randomize_b_(model, seed=1):
    """Random B in every adapter (a fresh B is zero, which would hide any mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tokens(vocab=64, T=12, seed=2):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- LoRALinear
def test_lora_linear_math():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    lora = LoRALinear(base, rank=2, alpha=6)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert lora.lora_A.shape == (2, 5) and lora.lora_B.shape == (3, 2) and lora.scaling == 3.0
    assert lora.lora_A.abs().max() <= 1 / 5 ** 0.5  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    assert not lora.lora_A.eq(0).any() and lora.lora_B.eq(0).all()
    assert torch.equal(lora(x), base(x))  # a fresh adapter changes nothing, exactly
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(3, 2))
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ A.T @ B.T)  # (4, 3)
    torch.testing.assert_close(lora(x), expected, atol=1e-6, rtol=0)


def test_lora_dropout_only_in_train_mode():
    torch.manual_seed(0)
    base = nn.Linear(8, 4).eval()
    lora = LoRALinear(base, rank=2, alpha=2, dropout=0.5)
    assert not lora.training  # follows the base's mode
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(4, 2))
    x = torch.randn(16, 8)
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    with torch.no_grad():
        torch.testing.assert_close(lora(x), base(x) + x @ A.T @ B.T, atol=1e-6, rtol=0)  # eval: no dropout
        lora.train()
        torch.manual_seed(5)
        out = lora(x)
        torch.manual_seed(5)
        dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask: zeros, survivors * 2
        torch.testing.assert_close(out, base(x) + dropped @ A.T @ B.T, atol=1e-6, rtol=0)
        assert not torch.allclose(out, base(x) + x @ A.T @ B.T)


def test_adapters_follow_base_device_and_dtype():
    base = nn.Linear(4, 6, device="meta", dtype=torch.bfloat16)
    lora = LoRALinear(base, rank=2, alpha=4)
    assert {(p.device.type, p.dtype) for p in (lora.lora_A, lora.lora_B)} == {("meta", torch.bfloat16)}


def test_fresh_adapters_keep_logits_exactly():
    for overrides in ({}, LLAMA_TINY):
        model = tiny_gpt(**overrides)
        with torch.no_grad():
            before = model(tokens())
            apply_lora(model, rank=4, alpha=8, dropout=0.1)
            assert torch.equal(model(tokens()), before)  # eval mode: the adapters' dropout is off too


# --------------------------------------------------------------------------------------------- apply_lora
def test_apply_lora_freezes_all_but_adapters():
    model = tiny_gpt()
    names = apply_lora(model, rank=4, alpha=8)
    assert names == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                           for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert model.transformer.h[0].attn.c_attn.weight.requires_grad is False
    assert lora_settings(model) == {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": names}


def test_state_dict_names_of_the_base_are_kept():
    model = tiny_gpt()
    base_keys = set(model.state_dict())
    names = apply_lora(model, rank=2, alpha=2, targets=DEFAULT_TARGETS + ("lm_head",))
    assert set(model.state_dict()) == base_keys | {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives the swap


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = tiny_gpt()
        self.head = nn.Linear(16, 3)


@pytest.mark.parametrize("targets, expected", [
    (("c_proj",), [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]),
    (("attn.c_proj",), ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    (("mlp.c_proj",), ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    (("lm_head",), ["lm_head"]),
    (("h.1.mlp.c_fc", "lm_head"), ["lm_head", "transformer.h.1.mlp.c_fc"]),
])
def test_target_patterns(targets, expected):
    model = tiny_gpt()
    assert apply_lora(model, rank=2, alpha=2, targets=targets) == sorted(expected)


def test_head_pattern_matches_a_classifier_head_not_lm_head():
    model = Classifier()
    assert apply_lora(model, rank=2, alpha=2, targets=("head", "c_attn")) == [
        "gpt.transformer.h.0.attn.c_attn", "gpt.transformer.h.1.attn.c_attn", "head"]
    assert isinstance(model.gpt.lm_head, nn.Linear) and isinstance(model.head, LoRALinear)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an integer >= 1, got 0"),
    (dict(rank=2.0), "rank must be an integer"),
    (dict(alpha=0), "alpha must be > 0, got 0"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(targets=("q_proj",)), r"target 'q_proj' matches no nn.Linear.*attn.c_attn.*lm_head"),
    (dict(targets=("attn",)), "target 'attn' matches no nn.Linear"),  # a module, but not a Linear
    (dict(targets=()), "targets is empty"),
])
def test_apply_lora_errors(kwargs, match):
    model = tiny_gpt()
    with pytest.raises(ScratchError, match=match):
        apply_lora(model, **{"rank": 2, "alpha": 4, **kwargs})
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_apply_lora_twice_is_refused():
    model = tiny_gpt()
    apply_lora(model, rank=2, alpha=4, targets=("c_attn",))
    with pytest.raises(ScratchError, match="already has LoRA on transformer.h.0.attn.c_attn"):
        apply_lora(model, rank=2, alpha=4, targets=("mlp.c_fc",))


def test_trainable_count_by_hand():
    """rank r = 4, n_embd 16, n_layer 2; each targeted Linear adds r * (in + out):

    GPT-2 style (n_head 2, 4x GELU MLP, hidden 64):
      c_attn 4*(16 + 48) = 256, attn.c_proj 4*(16 + 16) = 128, mlp.c_fc 4*(16 + 64) = 320,
      mlp.c_proj 4*(64 + 16) = 320; per layer 1024, times 2 layers = 2048.
    Llama style (n_head 2, n_kv_head 1, head_dim 8; SwiGLU hidden = ceil(8*16/3 / 64)*64 = 64):
      c_attn out = (2 + 2*1)*8 = 32: 4*(16 + 32) = 192, attn.c_proj 128, mlp.c_fc (gate+up) 4*(16 + 128) = 576,
      mlp.c_proj 4*(64 + 16) = 320; per layer 1216, times 2 layers = 2432.
    """
    for overrides, expected in (({}, 2048), (LLAMA_TINY, 2432)):
        model = tiny_gpt(**overrides)
        apply_lora(model, rank=4, alpha=8)
        assert count_lora_parameters(model) == expected
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# --------------------------------------------------------------------------------------------- merge_lora
def test_merge_keeps_logits_and_gives_plain_linears():
    for overrides in ({}, LLAMA_TINY):
        model = tiny_gpt(**overrides)
        base_keys = list(model.state_dict())
        names = apply_lora(model, rank=4, alpha=8)
        randomize_b_(model)
        with torch.no_grad():
            before = model(tokens())
            merged = merge_lora(model)
            after = merged(tokens())
        assert merged is model and (after - before).abs().max().item() <= 1e-5
        for name in names:
            m = model.get_submodule(name)
            assert type(m) is nn.Linear and m.weight.requires_grad is False
        assert list(model.state_dict()) == base_keys
        assert not any(p.requires_grad for p in model.parameters())


def test_merge_tied_lm_head_leaves_wte_alone():
    model = tiny_gpt()
    wte = model.transformer.wte.weight.detach().clone()
    base_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets=DEFAULT_TARGETS + ("lm_head",))
    randomize_b_(model)
    with torch.no_grad():
        before = model(tokens())
        merge_lora(model)
        after = model(tokens())
    assert (after - before).abs().max().item() <= 1e-5
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding is not modified
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_embeddings is False and set(model.state_dict()) == base_keys


def test_merge_in_bf16_is_computed_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, dtype=torch.bfloat16)
    w0 = base.weight.detach().clone()
    model = nn.Sequential(base)
    apply_lora(model, rank=2, alpha=4, targets=("0",))
    randomize_b_(model)
    lora = model[0]
    A, B = lora.lora_A.detach().float(), lora.lora_B.detach().float()
    merge_lora(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].weight, (w0.float() + 2.0 * B @ A).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------- disable, state
def test_disable_lora_gives_the_base_model_and_restores():
    model = tiny_gpt()
    with torch.no_grad():
        base = model(tokens())
    apply_lora(model, rank=4, alpha=8)
    randomize_b_(model)
    model.transformer.h[1].attn.c_attn.enabled = False  # a flag that was already off stays off
    with torch.no_grad():
        tuned = model(tokens())
        assert not torch.allclose(tuned, base)
        with disable_lora(model):
            assert torch.equal(model(tokens()), base)
        assert torch.equal(model(tokens()), tuned)
        with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
            raise RuntimeError("boom")
        assert torch.equal(model(tokens()), tuned)
    assert model.transformer.h[1].attn.c_attn.enabled is False and model.transformer.h[0].attn.c_attn.enabled
    with pytest.raises(ScratchError, match="no LoRA modules"), disable_lora(tiny_gpt()):
        pass


def test_lora_state_dict_and_gradients():
    model = tiny_gpt()
    names = apply_lora(model, rank=2, alpha=4, targets=("c_attn", "mlp.c_proj"))
    sd = lora_state_dict(model)
    assert set(sd) == {f"transformer.h.{i}.{m}.lora_{x}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")
                       for x in "AB"}
    assert sd["transformer.h.0.attn.c_attn.lora_A"].shape == (2, 16)
    assert sd["transformer.h.0.attn.c_attn.lora_B"].shape == (48, 2)
    randomize_b_(model)  # with B = 0 the gradient of A would be zero
    model.train()
    _, loss = model(tokens(), targets=tokens(seed=3))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)


def test_lora_settings_refuses_mixed_adapters():
    model = tiny_gpt()
    model.lm_head = LoRALinear(model.lm_head, rank=2, alpha=4)
    model.transformer.h[0].attn.c_attn = LoRALinear(model.transformer.h[0].attn.c_attn, rank=4, alpha=4)
    with pytest.raises(ScratchError, match="disagree on"):
        lora_settings(model)


# --------------------------------------------------------------------------------------------- against peft
R, ALPHA = 4, 8


def randomize_peft_(peft_model, seed=0) -> dict[str, torch.Tensor]:
    """Random values in every peft lora_A / lora_B; returns them by our names: 'base_model.model.X.lora_A.
    default.weight' -> 'X.lora_A' (peft keeps A (r, in) and B (out, r) as nn.Linear weights, as we do)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                ours = name.removeprefix("base_model.model.").replace(".default.weight", "")
                out[ours] = p.detach().clone()
    return out


def logits_diff(hf, ours, vocab=97):
    idx = tokens(vocab, T=20, seed=4)
    with torch.no_grad():
        return (hf(idx).logits - ours(idx)).abs().max().item()


def test_equals_peft_on_gpt2(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out) and computes x @ W; load_hf_model transposes W to our
    (out, in). peft's adapters on a Conv1D (fan_in_fan_out=True) are still nn.Linear modules applied to
    x: lora_A.weight (r, in), lora_B.weight (out, r), delta = scaling * B A x, exactly our layout; only
    the merge transposes (B A)^T into Conv1D's (in, out) weight. So A and B copy over untransposed.
    peft's "c_proj" matches both attn.c_proj and mlp.c_proj, as our pair of patterns does."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from scratchllm.weights.hf import load_hf_model

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=97, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    assert logits_diff(hf, ours) <= 1e-5
    base = GPT(ours.config)
    base.load_state_dict(ours.state_dict())
    lora_cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"],
                               lora_dropout=0.0, fan_in_fan_out=True)
    hf = peft.get_peft_model(hf, lora_cfg).eval()
    adapters = randomize_peft_(hf)
    apply_lora(ours, rank=R, alpha=ALPHA, targets=("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert set(adapters) == set(lora_state_dict(ours))
    ours.load_state_dict(adapters, strict=False)
    assert count_lora_parameters(ours) == hf.get_nb_trainable_parameters()[0] == 2 * R * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert logits_diff(hf, ours) <= 1e-5 and logits_diff(hf, base.eval()) > 1e-2  # the adapters do act
    assert logits_diff(hf.merge_and_unload(), merge_lora(ours)) <= 1e-5


def block_diag_lora(adapters: dict, layer: int, parts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused adapter of rank len(parts) * r equal to peft's separate rank-r adapters on `parts`:
    A = cat(A_1, A_2, ...) (k r, in), B = block_diag(B_1, B_2, ...) (sum of outs, k r), so that
    B A x = [B_1 A_1 x; B_2 A_2 x; ...] (rows in our fused order: q, k, v or gate, up)."""
    keys = [f"model.layers.{layer}.{p}" for p in parts]
    A = torch.cat([adapters[f"{k}.lora_A"] for k in keys], dim=0)  # (k r, in)
    B = torch.block_diag(*[adapters[f"{k}.lora_B"] for k in keys])  # (sum of outs, k r)
    return A, B


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_equals_peft_on_llama(tmp_path, tie):
    """peft puts a rank-r adapter on each of q_proj, k_proj, v_proj (and gate_proj, up_proj); our c_attn
    (c_fc) is one fused Linear. The exact equivalent is one adapter of rank 3r (2r) with alpha 3 alpha
    (2 alpha), the same scaling alpha / r, A stacked and B block-diagonal. Counts therefore differ: peft
    trains r*(3 in + out_q + out_k + out_v) on q/k/v, our fused rank r trains r*(in + out_q + out_k +
    out_v) (fewer), and the rank-3r equivalent here stores the zero blocks of B as well (more).
    o_proj / down_proj map one to one onto attn.c_proj / mlp.c_proj."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from scratchllm.weights.hf import load_hf_model

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                   tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    assert ours.config.tie_embeddings == tie and logits_diff(hf, ours) <= 1e-5
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                                 lora_dropout=0.0)).eval()
    adapters = randomize_peft_(hf)
    pieces = {"attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"],
              "attn.c_proj": ["self_attn.o_proj"], "mlp.c_proj": ["mlp.down_proj"]}
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.h):
            for ours_name, parts in pieces.items():
                parent, child = ours_name.split(".")
                k = len(parts)
                lora = LoRALinear(block.get_submodule(ours_name), rank=k * R, alpha=k * ALPHA)  # scaling alpha / r
                A, B = block_diag_lora(adapters, i, parts)
                lora.lora_A.copy_(A)
                lora.lora_B.copy_(B)
                setattr(block.get_submodule(parent), child, lora)
    assert logits_diff(hf, ours) <= 1e-5
    assert logits_diff(hf.merge_and_unload(), merge_lora(ours)) <= 1e-5
    assert ours.config.tie_embeddings == tie  # the head was not adapted: a tie stays


def test_lm_head_adapter_counts_in_the_loss():
    """GPT.forward(idx, targets) with a LoRA lm_head: the loss is the cross-entropy of the adapted logits
    (not of the bare lm_head weight), and the adapter gets a gradient."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    apply_lora(model, rank=2, alpha=4, targets=("lm_head",))
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    idx = torch.randint(0, 64, (2, 8))
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 64), idx.view(-1))
    _, loss = model(idx, targets=idx)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert model.lm_head.lora_A.grad is not None and model.lm_head.lora_A.grad.abs().sum() > 0
