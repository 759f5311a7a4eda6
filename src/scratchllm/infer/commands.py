"""The `scratchllm generate` subcommand: load a model folder and continue a prompt.

What it does: loads a model (our folder, a run folder, or a Hugging Face GPT-2 folder) with
`load_model`, casts it to the chosen precision, and prints the prompt followed by its continuation,
streamed as it is produced with --stream. The model's `<|endoftext|>` token stops generation unless
--ignore-eot is given. `--tokenizer` replaces the model's own tokenizer; when their fingerprints
differ a warning says so (the ids then stand for other text). Stop strings accept the escapes \\n, \\t and \\\\. A summary (tokens, seconds,
tokens/s) goes to stderr.
What it does not do: chat templates or serving (see serve/).

    scratchllm generate --model runs/demo/run --prompt "Once upon a time" --max-new-tokens 50 --stream
    scratchllm generate --model gpt2-folder/ --prompt "Hello" --temperature 0.7 --top-p 0.9 --seed 1 --stop '\\n\\n'
"""

from __future__ import annotations

import sys
import time

from scratchllm.common import ScratchError, select_device, select_precision, torch_dtype


def unescape(s: str) -> str:
    """Turn the escapes a shell user types into characters: '\\\\n' -> newline (non-ASCII text kept).

    >>> unescape("a\\\\n\\\\tb é")
    'a\\n\\tb é'
    """
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def replace_tokenizer(model, own, spec: str, model_path: str):
    """The tokenizer `--tokenizer SPEC` names, used in place of the model's own one (`own`, or None).

    Its ids must fit the model's vocab_size (an error otherwise). When the model has a tokenizer of its
    own and the two fingerprints differ, the ids mean other text than in training: the user asked for
    it, so it is used, with a warning that names both fingerprints."""
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.weights.checkpoint import check_vocab

    tokenizer = load_tokenizer(spec)
    check_vocab(model, tokenizer, f"--tokenizer {spec} with --model {model_path}")
    if own is not None and own.fingerprint() != tokenizer.fingerprint():
        print(f"warning: --tokenizer {spec} is not the tokenizer {model_path} was saved with (fingerprint "
              f"{tokenizer.fingerprint()[:16]} vs the model's {own.fingerprint()[:16]}): the same ids stand "
              "for other text, so expect gibberish. Using it as asked; leave out --tokenizer to use the "
              "model's own", file=sys.stderr)
    return tokenizer


def generate(args) -> int:
    from scratchllm.infer.detok import Detokenizer
    from scratchllm.infer.engine import Engine, text_deltas
    from scratchllm.infer.sampling import SamplingParams
    from scratchllm.weights.checkpoint import load_model

    # check the sampling parameters before any work (loading a model can take a while)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    if args.max_new_tokens < 0:
        raise ScratchError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = select_device(args.device)
    precision = select_precision(args.precision, device)
    model, tokenizer = load_model(args.model, device=device)
    if args.tokenizer:
        tokenizer = replace_tokenizer(model, tokenizer, args.tokenizer, args.model)
    if tokenizer is None:
        raise ScratchError(f"{args.model} has no tokenizer/ folder: pass --tokenizer DIR (or `gpt2`)")
    model = model.to(torch_dtype(precision))
    engine = Engine(model, tokenizer)

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        prompt_ids = tokenizer.encode(prompt, allowed_special="all")
    except ValueError as e:
        raise ScratchError(f"--prompt: {e}") from None
    if not prompt_ids and tokenizer.eot_token is not None:
        prompt_ids = [tokenizer.eot_token]  # an empty prompt: start from <|endoftext|>, as GPT-2 does
    stop_strings = [unescape(s) for s in args.stop or []]
    stop_ids = [] if tokenizer.eot_token is None or args.ignore_eot else [tokenizer.eot_token]
    tokens = engine.generate(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                             stop=stop_ids, seed=args.seed, truncate=not args.no_truncate)
    n = 0

    def counted(it):
        nonlocal n
        for t in it:
            n += 1
            yield t

    t0 = time.perf_counter()
    deltas = text_deltas(counted(tokens), Detokenizer(tokenizer, stop_strings))
    out = sys.stdout
    if not args.no_echo:
        out.write(prompt)
    if args.stream:
        for delta in deltas:
            out.write(delta)
            out.flush()
    else:
        out.write("".join(deltas))
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - t0
    print(f"[{device}, {precision}] {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0
