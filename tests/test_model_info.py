"""`model info` tests: parameter counts equal the built model's, FLOPs per token equal torch's own
FLOP counter, the activation estimate is within 10% of the tensors autograd really saves, and the CLI
prints the published GPT-2 size."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scratchllm.cli import main
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.info import activation_bytes, estimate, param_counts

LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False)
VARIANTS = [{}, {"tie_embeddings": False}, {"bias": False}, LLAMA, {**LLAMA, "attention": "naive"},
            {"attention": "naive"}, {**LLAMA, "qkv_bias": True}]
IDS = ["gpt2", "untied", "nobias", "llama", "llama-naive", "naive", "qwen2"]


@pytest.mark.parametrize("switches", VARIANTS, ids=IDS)
def test_param_counts_equal_the_built_model(switches):
    cfg = ModelConfig.from_preset("tiny", vocab_size=300, **switches)
    with torch.device("meta"):
        model = GPT(cfg)
    p = param_counts(cfg)
    assert p["total"] == model.num_params()
    assert p["non_embedding"] == model.num_params(non_embedding=True)
    assert p["total_untied"] == p["total"] + (300 * 128 if cfg.tie_embeddings else 0)


@pytest.mark.parametrize("switches", [{"attention": "naive"}, {**LLAMA, "attention": "naive"}], ids=["gpt2", "llama"])
def test_flops_per_token_equal_torch_flop_counter(switches):
    # naive attention: its matmuls are visible to the counter (the fused CPU SDPA kernel is not counted)
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, block_size=64, **switches)
    model = GPT(cfg)
    idx = torch.randint(0, 512, (2, 64))
    e = estimate(cfg, batch_size=2, block_size=64)
    with FlopCounterMode(display=False) as fwd:
        model(idx)
    assert fwd.get_total_flops() / 128 == e["flops_per_token"]["forward"]
    with FlopCounterMode(display=False) as train:
        _, loss = model(idx, targets=idx)
        loss.backward()
    assert train.get_total_flops() / 128 == e["flops_per_token"]["training"]


@pytest.mark.parametrize("switches", VARIANTS, ids=IDS)
def test_activation_estimate_is_close_to_what_autograd_saves(switches):
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, block_size=64, **switches)
    model = GPT(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, 512, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets=idx)
    measured = sum(saved.values())
    assert abs(activation_bytes(cfg, 4, 64) / measured - 1) < 0.10


def test_cli_prints_gpt2_numbers(capsys, tmp_path):
    assert main(["model", "info", "--preset", "gpt2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "163,037,184" in out and "KV cache 0.56 GiB" in out  # 2*12*8*1024*768*4 B
    assert main(["model", "info"]) == 2
    assert "exactly one of --preset" in capsys.readouterr().err
    assert main(["model", "info", "--model", str(tmp_path)]) == 2
