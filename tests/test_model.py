"""GPT model tests: logits and loss equal transformers' GPT-2 (and Llama for the Llama-style switches)
on the same random tiny weights; naive == sdpa attention (forward and gradients); init (gpt2 and
torch), tying, parameter counts of the GPT-2 presets, config validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchllm.common import IGNORE_INDEX, ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.config import PRESETS
from scratchllm.model.loss import linear_cross_entropy
from scratchllm.weights.hf import state_dict_from_hf

transformers = pytest.importorskip("transformers")


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (HF inits norms to 1/0 and biases to 0, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def hf_gpt2(vocab=101, n_positions=32, n_layer=2, n_head=4, n_embd=32, tie=True):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_layer=n_layer, n_head=n_head,
                                  n_embd=n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    perturb_(model)
    return model


def ours_from_hf(hf, attention: str) -> GPT:
    c = hf.config
    cfg = ModelConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                      n_embd=c.n_embd, tie_embeddings=c.tie_word_embeddings, attention=attention)
    model = GPT(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=not cfg.tie_embeddings)
    return model


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_and_loss_equal_hf_gpt2(attention, tie):
    hf = hf_gpt2(tie=tie)
    ours = ours_from_hf(hf, attention)
    idx = torch.randint(0, 101, (3, 32), generator=torch.Generator().manual_seed(1))
    labels = idx.clone()
    labels[0, 5:9] = IGNORE_INDEX
    with torch.no_grad():
        ref = hf(idx, labels=labels)
        logits = ours(idx)
        _, loss = ours(idx[:, :-1], targets=labels[:, 1:])  # HF shifts labels inside; we take them shifted
    assert logits.shape == (3, 32, 101)
    assert (logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def test_loss_sum_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    targets[1, :10] = IGNORE_INDEX
    logits = model(idx)
    none, loss_sum = model(idx, targets=targets, reduction="sum")
    _, loss_mean = model(idx, targets=targets)
    assert none is None  # the loss is computed in chunks; the full logits are never made
    # -log softmax(logits)[target], by hand, over the 22 kept positions
    logp = logits - logits.logsumexp(-1, keepdim=True)
    keep = targets != IGNORE_INDEX
    by_hand = -logp[keep].gather(1, targets[keep][:, None]).sum()
    assert torch.allclose(loss_sum, by_hand, atol=1e-4)
    assert torch.allclose(loss_mean, by_hand / 22, atol=1e-5)
    with pytest.raises(ScratchError, match="reduction"):
        model(idx, targets=targets, reduction="max")  # "none" is the per-token loss, see test_loss.py


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_linear_cross_entropy_equals_torch(reduction):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(37, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 37, (50,), generator=g)
    t[::7] = IGNORE_INDEX
    ref = F.cross_entropy(x @ w.T, t, ignore_index=IGNORE_INDEX, reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 3.0, (x, w))
    loss = linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=16)  # 16 does not divide 50
    grads = torch.autograd.grad(loss * 3.0, (x, w))
    assert torch.allclose(loss, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-5)  # fp32 sums in another order
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=16), ref, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: close to fp32
        loss_bf16 = linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=16)
    assert loss_bf16.dtype == torch.float32 and torch.allclose(loss_bf16, ref, rtol=2e-2)


def llama_pair(attention):
    """A tiny HF Llama and our rmsnorm + rope + swiglu + GQA model with the same weights."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                                   attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    perturb_(hf)
    ours = GPT(ModelConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                           tie_embeddings=False, norm="rmsnorm", positions="rope", mlp="swiglu", mlp_hidden=48,
                           attention=attention)).eval()
    sd = hf.state_dict()
    mapped = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"],
              "transformer.ln_f.weight": sd["model.norm.weight"]}
    for i in range(2):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        mapped[q + "attn.c_attn.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        mapped[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        mapped[q + "mlp.c_fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        mapped[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        mapped[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        mapped[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    ours.load_state_dict(mapped, strict=True)
    return hf, ours


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_llama_style_switches_equal_hf_llama(attention):
    hf, ours = llama_pair(attention)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


LLAMA_STYLE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False)


@pytest.mark.parametrize("switches", [{}, LLAMA_STYLE], ids=["gpt2", "llama"])
def test_naive_equals_sdpa_forward_and_grads(switches):
    cfg = ModelConfig.from_preset("tiny", vocab_size=64, block_size=32, **switches)
    torch.manual_seed(0)
    naive = GPT(ModelConfig(**{**cfg.to_dict(), "attention": "naive"}))
    sdpa = GPT(ModelConfig(**{**cfg.to_dict(), "attention": "sdpa"}))
    sdpa.load_state_dict(naive.state_dict())
    perturb_(naive)
    perturb_(sdpa)
    idx = torch.randint(0, 64, (2, 32))
    targets = torch.randint(0, 64, (2, 32))
    assert (naive(idx) - sdpa(idx)).abs().max().item() <= 1e-5
    _, loss_n = naive(idx, targets=targets)
    _, loss_s = sdpa(idx, targets=targets)
    loss_n.backward()
    loss_s.backward()
    grads_s = dict(sdpa.named_parameters())
    for name, p in naive.named_parameters():
        assert (p.grad - grads_s[name].grad).abs().max().item() <= 1e-5, name


def test_gpt2_init_and_tying():
    cfg = ModelConfig.from_preset("small", vocab_size=1000)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.bias is None
    h0 = model.transformer.h[0]
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(h0.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.0005
    assert abs(h0.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.0005
    assert h0.attn.c_attn.bias.abs().sum() == 0 and torch.all(h0.ln_1.weight == 1)
    untied = GPT(ModelConfig.from_preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_torch_init_keeps_pytorch_defaults():
    # the book's GPTModel (ch. 5): nn.Embedding N(0, 1), nn.Linear Kaiming-uniform, LayerNorm ones / zeros
    cfg = ModelConfig.from_preset("small", vocab_size=1000, init="torch")
    torch.manual_seed(0)
    model = GPT(cfg)
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert abs(wte.std().item() - 1.0) < 0.01 and abs(wpe.std().item() - 1.0) < 0.01
    assert model.lm_head.weight is wte  # tying is its own switch
    h0 = model.transformer.h[0]
    for lin in (h0.attn.c_attn, h0.attn.c_proj, h0.mlp.c_fc, h0.mlp.c_proj):
        bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert lin.weight.abs().max().item() <= bound and lin.weight.abs().max().item() > 0.95 * bound
        assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # not normal(0.02)
        assert lin.bias.abs().max().item() <= bound and lin.bias.abs().sum() > 0  # biases not zeroed
    assert torch.all(h0.ln_1.weight == 1) and torch.all(h0.ln_1.bias == 0)
    # the same draws as building the modules by hand: nothing is re-initialised after construction
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Embedding(1000, cfg.n_embd).weight, wte)
    with pytest.raises(ScratchError, match="init must be one of"):
        ModelConfig(init="xavier")


@pytest.mark.parametrize("name, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                            ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts_match_published_gpt2(name, expected):
    # the counts transformers reports for openai-community/gpt2{,-medium,-large,-xl}
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    assert model.num_params() == expected
    cfg = PRESETS[name]
    assert model.num_params(non_embedding=True) == expected - (cfg.vocab_size + cfg.block_size) * cfg.n_embd


def test_tiny_preset_is_about_one_million_non_embedding_params():
    with torch.device("meta"):
        n = GPT(ModelConfig.from_preset("tiny")).num_params(non_embedding=True)
    assert 0.5e6 < n < 1.5e6


def test_learned_positions_past_block_size_is_a_clear_error():
    model = GPT(ModelConfig.from_preset("tiny", block_size=8))
    with pytest.raises(ScratchError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    rope = GPT(ModelConfig.from_preset("tiny", block_size=8, positions="rope"))
    assert rope(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 4096)  # rotary positions extrapolate


def test_config_validation_and_round_trip():
    cfg = ModelConfig.from_preset("tiny", n_kv_head=2, norm="rmsnorm")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["init"] == "gpt2"
    assert ModelConfig.from_dict({**cfg.to_dict(), "init": "torch"}).init == "torch"
    old_json = {k: v for k, v in cfg.to_dict().items() if k != "init"}  # a config.json from before `init`
    assert ModelConfig.from_dict(old_json) == cfg
    with pytest.raises(ScratchError, match="unknown key.*n_ctx"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_ctx": 5})
    with pytest.raises(ScratchError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ScratchError, match="n_kv_head"):
        ModelConfig.from_preset("tiny", n_kv_head=3)
    with pytest.raises(ScratchError, match="norm must be one of"):
        ModelConfig.from_preset("tiny", norm="batchnorm")
    with pytest.raises(ScratchError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ScratchError, match="dropout"):
        ModelConfig(dropout=1.5)


def test_dropout_is_active_only_in_training():
    model = GPT(ModelConfig.from_preset("tiny", dropout=0.5, attention="naive"))
    idx = torch.randint(0, 4096, (1, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    assert F.softmax(model(idx), -1).sum(-1).allclose(torch.ones(1, 16))


def test_public_names():
    import scratchllm

    assert scratchllm.GPT is GPT and scratchllm.ModelConfig is ModelConfig
    model = scratchllm.GPT(scratchllm.ModelConfig.from_preset("tiny"))
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 4096)
    assert callable(scratchllm.load_hf_gpt2) and callable(scratchllm.export_hf)
    from scratchllm.infer.engine import Engine

    assert scratchllm.Engine is Engine and isinstance(Engine, type)


def test_relu_mlp_and_post_norm_blocks_compute_what_they_say():
    """The lab's switches (lab/): a ReLU MLP, and post-norm blocks norm(x + f(x)), checked by hand on one block."""
    from scratchllm.model.gpt import Block

    torch.manual_seed(0)
    cfg = ModelConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, mlp="relu", norm_position="post")
    block = Block(cfg, 0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = block.ln_1(x + block.attn(x))
        mlp = block.mlp.c_proj(F.relu(block.mlp.c_fc(h)))
        assert torch.allclose(block(x), block.ln_2(h + mlp), atol=1e-6)
        pre = Block(ModelConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16), 0).eval()
        h = x + pre.attn(pre.ln_1(x))
        assert torch.allclose(pre(x), h + pre.mlp(pre.ln_2(h)), atol=1e-6)
    assert not cfg.is_gpt2 and ModelConfig(mlp="relu").hidden_dim == 4 * 768
    with pytest.raises(ScratchError, match="norm_position"):
        ModelConfig(norm_position="middle")
