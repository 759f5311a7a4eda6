"""The `scratchllm generate` subcommand: load a model and continue a prompt, or answer a chat message.

What it does: loads anything `--model` accepts (our folder, a run folder, a Hugging Face folder, a
.gguf file, a registry name such as smollm2-135m-instruct: see weights/registry.py) with
`open_model`, casts it to the chosen precision, and prints the prompt followed by its continuation,
streamed as it is produced with --stream. `--chat MESSAGE` instead renders a one-turn conversation
(`--system` replaces the model's default system prompt) in the model's chat format (its chat.json,
or `--chat-format`), streams only the answer, and stops at the format's end-of-turn token. The
model's `<|endoftext|>` token stops generation unless --ignore-eot is given. `--tokenizer` replaces
the model's own tokenizer; when their fingerprints differ a warning says so (the ids then stand for
other text). Stop strings accept the escapes \\n, \\t and \\\\. A summary (tokens, seconds, tokens/s)
goes to stderr.
What it does not do: define chat formats (tokenizer/chat.py) or serve (serve/).

    scratchllm generate --model runs/demo/run --prompt "Once upon a time" --max-new-tokens 50 --stream
    scratchllm generate --model smollm2-135m-instruct --chat "What is the capital of France?"
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


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's ids, special-token texts (<|endoftext|>, ...) as their ids; an empty prompt starts from
    <|endoftext|>, as GPT-2 does ([] when the tokenizer has none). ValueError for a text encode refuses."""
    ids = tokenizer.encode(text, allowed_special="all")
    if not ids and tokenizer.eot_token is not None:
        ids = [tokenizer.eot_token]
    return ids


WEIGHTS_HELP = ("how the weights are stored while decoding: auto (default) = bf16 with fused kernels on CPUs "
                "(a GGUF file's Q8_0/Q4_0/Q4_1 tensors as stored), the --precision dtype on GPUs; fp32; bf16; "
                "int8 / int4 (CPU only; their weight error is printed). See docs/quantization.md")
PRECISION_HELP = ("compute dtype (auto: bf16 where the hardware is fast at it, else fp32); on the CPU, "
                  "--weights auto/bf16/int8/int4 compute in fp32, except --precision bf16 with bf16 weights "
                  "(oneDNN's bf16 kernels: AMX on Intel)")


def open_for_inference(spec: str, device_name: str, precision_name: str, need: str | None,
                       weights: str = "fp32"):
    """(LoadedModel ready to decode, device, what it runs as) of `--model spec` with `--precision` and
    `--weights` (see WEIGHTS_HELP). `need` (a command that cannot work without the model's own tokenizer)
    or None. On the CPU, bf16/int8/int4 weights are quantized in place (model/quant.py) or, from a GGUF
    file, read as stored (weights/gguf.py: load_gguf_quantized); "what it runs as" reads like
    "cpu, fp32, int4 weights (96 MB)"."""
    from scratchllm.model.quant import FORMATS, kernels, quantize_model, weight_bytes, weights_label
    from scratchllm.weights.checkpoint import LoadedModel, open_model
    from scratchllm.weights.registry import gguf_source

    if weights not in ("auto", *FORMATS):
        raise ScratchError(f"unknown --weights {weights!r}: choose auto, {', '.join(FORMATS)}")
    device = select_device(device_name)
    on_cpu = device == "cpu"
    if not on_cpu and weights in ("int8", "int4"):
        raise ScratchError(f"--weights {weights} runs on the CPU only (its kernels are x86 code); on {device} "
                           "use --weights bf16 or fp32 (or --device cpu)")
    if precision_name != "auto" and weights in ("fp32", "bf16") and precision_name != weights and \
            not (on_cpu and weights == "bf16"):
        raise ScratchError(f"--weights {weights} with --precision {precision_name}: give one of them (or the same)")
    if on_cpu and weights in ("int8", "int4") and precision_name not in ("auto", "fp32"):
        raise ScratchError(f"--weights {weights} computes in fp32 on the CPU: leave out --precision {precision_name}")
    quantized = on_cpu and weights in ("auto", "bf16", "int8", "int4") and precision_name in ("auto", "fp32")
    if quantized and weights == "auto" and kernels() is None:
        quantized = False  # the warning said why; plain fp32 beats unfused dequantization
        weights = "fp32"
    if quantized:
        fmt = "bf16" if weights == "auto" else weights
        source = gguf_source(spec)
        if source is not None:
            from scratchllm.weights.gguf import load_gguf_quantized

            model, tokenizer, chat, _ = load_gguf_quantized(source, weights)
            loaded = LoadedModel(model, tokenizer, chat, source.parent)
        else:
            loaded = open_model(spec, device=device)
            quantize_model(loaded.model, fmt)
        precision = "fp32"
    else:
        if weights in ("fp32", "bf16") and precision_name == "auto":
            precision_name = weights
        precision = select_precision(precision_name, device)
        loaded = open_model(spec, device=device)
        loaded.model = loaded.model.to(torch_dtype(precision))
    if need is not None and loaded.tokenizer is None:
        raise ScratchError(f"{spec} has no tokenizer/ folder: {need} needs the model's tokenizer")
    what = f"{device}, {precision}, {weights_label(loaded.model)} weights ({weight_bytes(loaded.model) / 1e6:.0f} MB)"
    errors = [qe for qe in quant_errors(loaded.model) if qe[0] in ("int8", "int4")]
    if errors:
        what += "; rounding error (rms, relative to each matrix) " + ", ".join(
            f"{fmt} {err:.2%}" for fmt, err in errors)
    return loaded, device, what


def quant_errors(model) -> list[tuple[str, float]]:
    """(format, rms rounding error relative to the weights' rms) of each format quantize_model measured
    (from a GGUF file read as stored: none, the file's weights are exact)."""
    from scratchllm.model.quant import QuantEmbedding, QuantLinear

    sums: dict[str, list[float]] = {}
    seen = set()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight.error is not None and id(m.weight) not in seen:
            seen.add(id(m.weight))
            acc = sums.setdefault(m.weight.fmt, [0.0, 0.0])
            acc[0] += m.weight.error[0]
            acc[1] += m.weight.error[1]
    return [(fmt, (e / max(w, 1e-30)) ** 0.5) for fmt, (e, w) in sorted(sums.items())]


def chat_prompt(args, loaded, tokenizer) -> tuple[list[int], list[int | str]]:
    """(prompt ids, stops) of `--chat MESSAGE`: the conversation [system?, user] rendered in the
    model's chat format (or --chat-format), ending with the assistant's turn opened; the stops are
    token ids, and texts for markers the tokenizer lacks as special tokens (phi3 on GPT-2's)."""
    from scratchllm.tokenizer.chat import FORMATS, pick_format, render, stop_sequences

    fmt = pick_format(args.chat_format, loaded.chat)
    if fmt is None:
        raise ScratchError(f"{args.model} does not say which chat format it speaks (no chat.json, or a chat "
                           f"template we do not know): pass --chat-format ({', '.join(FORMATS)})")
    message = sys.stdin.read() if args.chat == "-" else args.chat
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": message}]
    return render(fmt, messages, tokenizer, add_generation_prompt=True), stop_sequences(fmt, tokenizer)


def generate(args) -> int:
    from scratchllm.infer.detok import Detokenizer
    from scratchllm.infer.engine import Engine, text_deltas
    from scratchllm.infer.sampling import SamplingParams

    # check the sampling parameters before any work (loading a model can take a while)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    if args.max_new_tokens < 0:
        raise ScratchError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.chat is None and (args.system is not None or args.chat_format):
        raise ScratchError("--system and --chat-format go with --chat MESSAGE (not --prompt)")
    loaded, device, what = open_for_inference(args.model, args.device, args.precision, None, args.weights)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.tokenizer:
        tokenizer = replace_tokenizer(model, tokenizer, args.tokenizer, args.model)
    if tokenizer is None:
        raise ScratchError(f"{args.model} has no tokenizer/ folder: pass --tokenizer DIR (or `gpt2`)")
    engine = Engine(model, tokenizer)

    stop_ids = [] if tokenizer.eot_token is None or args.ignore_eot else [tokenizer.eot_token]
    text_stops: list[str] = []
    if args.chat is not None:
        prompt, (prompt_ids, chat_stops) = "", chat_prompt(args, loaded, tokenizer)
        stop_ids += [] if args.ignore_eot else [t for t in chat_stops if isinstance(t, int)]
        text_stops = [t for t in chat_stops if isinstance(t, str)]  # cut by the detokenizer, which sees them whole
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        try:
            prompt_ids = encode_prompt(tokenizer, prompt)
        except ValueError as e:
            raise ScratchError(f"--prompt: {e}") from None
    stop_strings = [unescape(s) for s in args.stop or []] + text_stops
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
    if not args.no_echo:  # a chat answer is never echoed with its template
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
    print(f"[{what}] {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0
