"""`scratchllm eval generate` and `eval loss`: an instruction-tuned model's answers and its masked loss.

What it does: `generate_responses` renders each record's conversation up to its last answer in the
model's chat format (its chat.json, or --template), generates every answer in batches
(Engine.generate_batch: prompts sorted by length, left-padded; greedy by default), stopping at the
format's end-of-turn, and writes one JSON line per record: id, where, instruction, input, output (the
reference answer) and response (the model's) - the file `eval judge` scores. `masked_loss` is the mean
cross-entropy of the reference answers' tokens (the loss SFT trains, prompt tokens masked) and its
perplexity. Both default to the run's own held-out split (RUN/test.jsonl) when --data is left out.
What it does not do: score answers (eval/judge.py) or train (train/sft.py).

    scratchllm eval generate --model runs/sft --out runs/sft/responses.jsonl
    scratchllm eval loss --model runs/sft --data data:instruction-data
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from scratchllm.common import (
    Progress,
    ScratchError,
    atomic_write_text,
    select_device,
    select_precision,
    torch_dtype,
)


def default_data(model: str, data: str | None) -> str:
    """--data, or the run's held-out split (RUN/test.jsonl, written by `scratchllm sft`)."""
    if data:
        return data
    for folder in (Path(model), Path(model).parent):
        if (folder / "test.jsonl").is_file():
            return str(folder / "test.jsonl")
    raise ScratchError(f"{model} has no test.jsonl (it is not an `scratchllm sft` run folder): pass --data FILE")


def open_for_eval(args):
    """(model in the chosen precision, tokenizer, chat format, device, precision) of --model."""
    from scratchllm.train.sft import choose_format
    from scratchllm.weights.checkpoint import open_model

    device = select_device(args.device)
    precision = select_precision(args.precision, device)
    loaded = open_model(args.model, device=device)
    if loaded.tokenizer is None:
        raise ScratchError(f"--model {args.model} has no tokenizer/ folder")
    fmt = choose_format(args.template or "", loaded.chat, args.model)
    return loaded.model, loaded.tokenizer, fmt, device, precision


def generate_responses(engine, convs, fmt, tokenizer, max_new_tokens: int = 256, batch_size: int = 8,
                       temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                       progress: bool = True) -> list[dict]:
    """One record per conversation: the reference fields and the model's answer to the last question."""
    from scratchllm.data.instructions import instruction_fields
    from scratchllm.infer.detok import Detokenizer
    from scratchllm.infer.engine import text_deltas
    from scratchllm.tokenizer.chat import turn_stops
    from scratchllm.train.sft import answer_prompt

    stop_ids, stop_texts = turn_stops(fmt, tokenizer)
    prompts = [answer_prompt(conv, fmt, tokenizer) for conv in convs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: dict[int, str] = {}
    bar = Progress(total=len(prompts), unit="answers", desc="generate", enabled=progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = engine.generate_batch([prompts[i] for i in chunk], max_new_tokens, temperature=temperature,
                                     top_p=top_p, stop=stop_ids, seed=seed)
        for i, ids in zip(chunk, outs):
            answers[i] = "".join(text_deltas(ids, Detokenizer(tokenizer, stop_texts))).strip()
        bar.update(len(chunk))
    bar.close()
    records = []
    for i, conv in enumerate(convs):
        instruction, input_, output = instruction_fields(conv)
        records.append({"id": i, "where": conv.where, "instruction": instruction, "input": input_, "output": output,
                        "response": answers[i]})
    return records


@torch.no_grad()
def masked_loss(model, enc, batch_size: int, device: str, precision: str) -> dict:
    """Mean masked cross-entropy (and perplexity) of an sft.Encoded split: summed, then divided once."""
    from scratchllm.train.core import _to
    from scratchllm.train.objectives import masked_lm_objective

    total, count = 0.0, 0
    dtype = torch_dtype(precision)
    for start in range(0, len(enc), batch_size):
        batch = _to(enc.collate(list(range(start, min(start + batch_size, len(enc))))), device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss, metrics = masked_lm_objective(model, batch)
        total += float(loss)
        count += int(metrics["count"])
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(enc.pairs)}


# --------------------------------------------------------------------------------------------- commands
def run_generate(args) -> int:
    """`scratchllm eval generate --model RUN [--data F] --out responses.jsonl`."""
    from scratchllm.data.instructions import read_conversations
    from scratchllm.infer.engine import Engine

    if args.max_new_tokens < 1 or args.batch_size < 1 or args.limit < 0:
        raise ScratchError(f"--max-new-tokens and --batch-size must be >= 1 and --limit >= 0 (got "
                           f"{args.max_new_tokens}, {args.batch_size}, {args.limit})")
    out = Path(args.out)
    if out.is_dir():
        raise ScratchError(f"--out {out} is a folder: give a .jsonl file name")
    data = default_data(args.model, args.data)
    convs = read_conversations(data)[:args.limit or None]
    model, tokenizer, fmt, device, precision = open_for_eval(args)
    engine = Engine(model.to(torch_dtype(precision)), tokenizer)
    t0 = time.perf_counter()
    records = generate_responses(engine, convs, fmt, tokenizer, args.max_new_tokens, args.batch_size,
                                 args.temperature, args.top_p, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{len(records)} answers from {args.model} ({fmt.name} format, {precision} on {device}) to {data} in "
          f"{time.perf_counter() - t0:.0f} s: {out}", file=sys.stderr)
    for r in records[:args.show]:
        print(f"### {r['instruction'][:200]}\n--- reference: {r['output'][:200]}\n--- model: {r['response'][:200]}\n")
    return 0


def run_loss(args) -> int:
    """`scratchllm eval loss --model RUN [--data F]`: mean masked loss of the reference answers."""
    from scratchllm.data.instructions import read_conversations
    from scratchllm.train.sft import Encoded

    if args.max_length < 0:
        raise ScratchError(f"--max-length must be >= 0 (0 = the model's block_size), got {args.max_length}")
    data = default_data(args.model, args.data)
    convs = read_conversations(data)
    model, tokenizer, fmt, device, precision = open_for_eval(args)
    block = model.config.block_size
    max_length = min(args.max_length or block, block)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    enc = Encoded(convs, fmt, tokenizer, max_length, pad_id, mask_prompt=args.mask_prompt)
    if not enc.pairs:
        raise ScratchError(f"{data}: no example has a trained token within {max_length} tokens")
    result = {"data": data, "model": args.model, "format": fmt.name, **masked_loss(model.eval(), enc, args.batch_size,
                                                                                  device, precision),
              "skipped": enc.skipped, "cut": enc.cut}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{data}: masked loss {result['loss']:.4f} (perplexity {result['ppl']:.2f}) over {result['tokens']:,} "
              f"answer tokens of {result['examples']} examples ({fmt.name} format"
              + (f"; {enc.skipped} skipped, {enc.cut} cut at {max_length} tokens" if enc.skipped or enc.cut else "")
              + ")")
    return 0

