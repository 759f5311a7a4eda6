"""`scratchllm eval judge`: score each model response 0-100 with an LLM judge (the book's chapter 7).

What it does: reads a responses JSONL (`scratchllm eval generate`: instruction, input, output = the
reference answer, response = the model's answer; optional id), builds the book's judge prompt for each
line (`judge_prompt`) and sends it as one user message to any OpenAI-compatible chat endpoint
(llama.cpp server, Ollama, vLLM, ours) with temperature 0 and seed 123, `--workers` requests at a time.
A busy or failing server (connection errors, timeouts, HTTP 429 and 5xx) is retried with a short
exponential backoff; any other HTTP 4xx fails at once with the server's message. Every reply is
appended to a cache as it arrives (one JSON line: sha256 of judge model + prompt, reply), so a rerun or
a run after a crash asks only for what is missing; a torn last line is cut off. `parse_score` reads the
score from each reply; replies it cannot read are kept with score None, counted, shown and left out of
the mean. At the end it writes the scores JSONL, a Markdown report and a histogram PNG, and prints the
summary.
What it does not do: generate the responses (`eval generate`), start a judge server or change the
book's prompt; it reads only the first number of each reply (see `parse_score`). The cache is keyed by
judge model and prompt only: after a change of --max-tokens or of the server behind the URL, delete
the cache to ask again.

    scratchllm eval judge runs/sft/responses.jsonl --judge-url http://localhost:11434 --judge-model llama3
    # -> responses.scores.jsonl, responses.judge.md, responses.judge.png, responses.judge-cache.jsonl

"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import math
import os
import re
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

from scratchllm.common import Progress, ScratchError, atomic_write_text, check_can_create, print0
from scratchllm.io.jsonl import read_jsonl

FIELDS = ("instruction", "input", "output", "response")  # what every responses line must hold
BACKOFF_BASE, BACKOFF_MAX = 0.5, 8.0  # seconds: wait BACKOFF_BASE * 2**k before retry k+1, capped
SEED = 123  # the book's
SHOWN = 5  # unparsed replies shown in the summary
_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


def format_input(entry: dict) -> str:
    """The Alpaca prompt without its response header (the book's `format_input`)."""
    instruction_text = ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def judge_prompt(entry: dict) -> str:
    """The book's judge prompt, word for word, for one responses line."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def parse_score(reply: str) -> int | None:
    """The first number in the reply as a score 0..100, or None. A number written as a fraction
    ("8/10", "7 out of 10", "85/100") is rescaled to 100; decimals round half up; out of range: None.

        parse_score("Score: 90.") -> 90    parse_score("**70**") -> 70    parse_score("8/10") -> 80
        parse_score("85/100") -> 85        parse_score("150") -> None     parse_score("good") -> None
    """
    m = _SCORE.search(reply)
    if m is None:
        return None
    value = float(m[1])
    if m[2] is not None:
        scale = float(m[2])
        if scale <= 0:
            return None
        value = 100 * value / scale
    score = math.floor(value + 0.5)
    return score if 0 <= score <= 100 else None


def chat_url(url: str) -> str:
    """The chat completions URL from a server's address:

        http://h:8080 -> http://h:8080/v1/chat/completions    http://h:8080/v1 -> .../v1/chat/completions
        http://h/api/chat/completions -> unchanged            http://h/openai -> http://h/openai/chat/completions
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ScratchError(f"--judge-url {url!r} is not an http(s) URL: give e.g. http://localhost:8080/v1")
    base = url.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if parts.path.strip("/") else "/v1/chat/completions")


def read_responses(path: str | Path) -> list[dict]:
    """The JSON objects of a responses file, each checked to hold FIELDS as strings; blank lines skipped."""
    path = Path(path)
    entries = []
    for where, entry in read_jsonl(path):
        if not isinstance(entry, dict):
            raise ScratchError(f"{where}: expected a JSON object, got a {type(entry).__name__}")
        for field in FIELDS:
            if not isinstance(entry.get(field), str):
                what = "is missing" if field not in entry else f"must be a string, got {type(entry[field]).__name__}"
                raise ScratchError(f"{where}: field {field!r} {what} (each line needs {', '.join(FIELDS)})")
        entries.append(entry)
    if not entries:
        raise ScratchError(f"{path} holds no responses: expected JSON lines with {', '.join(FIELDS)} "
                           "(written by `scratchllm eval generate`)")
    return entries


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt]).encode("utf-8")).hexdigest()


def load_cache(path: Path) -> dict[str, str]:
    """key -> reply of each line of the cache. A torn last line (a crash mid-write) is cut off the
    file, so that the next append starts on a line of its own."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    replies = {}
    for i, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            replies[rec["key"]] = str(rec["reply"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ScratchError(f"{path}:{i}: not a judge cache line; delete the line or the file "
                               "(it only saves asking again)") from None
    return replies


def _server_message(e: urllib.error.HTTPError) -> str:
    """The error text of an HTTP error body: OpenAI's {"error": {"message": ...}}, {"error": ...} or text."""
    body = e.read().decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(body)["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (json.JSONDecodeError, KeyError, TypeError):
        return body[:300] or str(e.reason)


def ask_judge(url: str, model: str, prompt: str, *, timeout: float = 60.0, retries: int = 3,
              max_tokens: int = 16, api_key: str | None = None) -> str:
    """The judge's reply text to one prompt, sent as one user message to the chat completions `url`."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens, "seed": SEED}).encode("utf-8")
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    why = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(BACKOFF_BASE * 2 ** (attempt - 1), BACKOFF_MAX))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}: {_server_message(e)}"
            if e.code != 429 and e.code < 500:
                raise ScratchError(f"judge {url} refused the request ({why}); check --judge-url, "
                                   "--judge-model and --api-key") from None
            continue
        except (OSError, http.client.HTTPException) as e:
            why = str(getattr(e, "reason", None) or e) or type(e).__name__
            continue
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise ScratchError(f"judge {url} answered, but not with a chat completion: "
                               f"{raw[:200].decode('utf-8', errors='replace')!r}") from None
        return content or ""
    raise ScratchError(f"judge {url} did not answer after {retries + 1} attempt{'s' * (retries > 0)} (last: {why})")


def score_responses(entries: list[dict], url: str, model: str, *, cache_path: str | Path, timeout: float = 60.0,
                    retries: int = 3, workers: int = 1, max_tokens: int = 16, api_key: str | None = None,
                    progress: bool = True) -> list[dict]:
    """Each entry + "score" (int or None) + "judge_reply", in entry order. Only prompts missing from the
    cache are sent (identical prompts once); each reply is appended to the cache as it arrives. When a
    request fails, the replies in flight are still cached, then ScratchError says how many are."""
    url, cache_path = chat_url(url), Path(cache_path)
    prompts = [judge_prompt(e) for e in entries]
    keys = [cache_key(model, p) for p in prompts]
    replies = load_cache(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    todo = {k: p for k, p in zip(keys, prompts) if k not in replies}
    if todo:
        print0(f"judge: {len(set(keys)) - len(todo)} replies cached, asking {url} ({model}) for {len(todo)}")
    bar = Progress(len(todo), unit="replies", desc="judge", enabled=progress)
    waiting, in_flight, failure = iter(todo.items()), {}, None
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with open(cache_path, "a", encoding="utf-8") as cache:
            while True:
                for key, prompt in itertools.islice(waiting, 0 if failure else workers - len(in_flight)):
                    in_flight[pool.submit(ask_judge, url, model, prompt, timeout=timeout, retries=retries,
                                          max_tokens=max_tokens, api_key=api_key)] = key
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    key = in_flight.pop(fut)
                    try:
                        replies[key] = fut.result()
                    except ScratchError as e:  # send no more; the requests in flight still finish
                        failure = failure or e
                        continue
                    cache.write(json.dumps({"key": key, "model": model, "reply": replies[key]}, ensure_ascii=False)
                                + "\n")
                    cache.flush()
                    bar.update(1)
    finally:
        pool.shutdown(wait=False)  # Ctrl-C: do not wait for the requests in flight
        bar.close()
    if failure is not None:
        cached = sum(k in replies for k in keys)
        raise ScratchError(f"{failure}; {cached} of {len(entries)} entries are scored and cached in {cache_path}: "
                           "rerun to ask only for the rest")
    return [{**e, "score": parse_score(replies[k]), "judge_reply": replies[k]} for k, e in zip(keys, entries)]


def summarize(results: list[dict]) -> dict:
    """n, the parsed scores' mean / median, counts in bins 0-9, ..., 80-89, 90-100, and the unparsed rows."""
    scores = [r["score"] for r in results if r["score"] is not None]
    bins = [0] * 10
    for s in scores:
        bins[min(s // 10, 9)] += 1
    return {"n": len(results), "scored": len(scores), "bins": bins,
            "mean": statistics.fmean(scores) if scores else None,
            "median": statistics.median(scores) if scores else None,
            "unparsed": [(i, r) for i, r in enumerate(results, 1) if r["score"] is None]}


def _bin_name(b: int) -> str:
    return f"{10 * b}-{10 * b + 9 + (b == 9)}"  # the last bin holds 100


def _quote(text: str, width: int = 80) -> str:
    """One line of inline code: `_quote("a\\nb")` -> '`"a\\nb"`' (newlines escaped, long text cut)."""
    short = text if len(text) <= width else text[:width] + "..."
    return "`" + json.dumps(short, ensure_ascii=False).replace("`", "'") + "`"


def summary_lines(s: dict) -> list[str]:
    """The summary as Markdown: scored count, mean, median, the distribution table, unparsed examples."""
    unparsed = len(s["unparsed"])
    mean = "n/a" if s["mean"] is None else f"{s['mean']:.2f}"
    median = "n/a" if s["median"] is None else f"{s['median']:g}"
    lines = [f"- **scored**: {s['scored']} of {s['n']}"
             + (f" ({unparsed} unparsed {'reply' if unparsed == 1 else 'replies'}, left out of the mean and the table)" if unparsed else ""),
             f"- **mean score**: {mean}", f"- **median score**: {median}", "",
             "| score  | count |  share | bar |", "|:-------|------:|-------:|:----|"]
    for b, count in enumerate(s["bins"]):
        share = count / s["scored"] if s["scored"] else 0.0
        lines.append(f"| {_bin_name(b):<6} | {count:>5} | {share:>6.1%} | {'#' * round(40 * share)} |")
    if unparsed:
        lines += ["", f"Unparsed replies (first {min(unparsed, SHOWN)} of {unparsed}):", ""]
        lines += [f"- line {i}{' (id ' + str(r['id']) + ')' if 'id' in r else ''}: {_quote(r['judge_reply'])}"
                  for i, r in s["unparsed"][:SHOWN]]
    return lines


def plot_scores(s: dict, png: str | Path, title: str) -> None:
    """A bar chart of the score bins, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchllm.train.runlog import save_png

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar(range(10), s["bins"], color="tab:blue")
    ax.set_xticks(range(10), [_bin_name(b) for b in range(10)], rotation=30)
    ax.set_xlabel("judge score")
    ax.set_ylabel("responses")
    ax.set_title(title)
    save_png(fig, png)


def run_judge(args) -> int:
    """The CLI handler: read, score (resumably), write scores / report / PNG, print the summary."""
    if not args.timeout > 0:
        raise ScratchError(f"--timeout must be > 0 seconds, got {args.timeout}")
    for name, low in (("retries", 0), ("workers", 1), ("max_tokens", 1)):
        if getattr(args, name) < low:
            raise ScratchError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    responses = Path(args.responses)
    base = responses.parent / responses.stem
    out = Path(args.out or f"{base}.scores.jsonl")
    cache = Path(args.cache or f"{base}.judge-cache.jsonl")
    report = Path(args.report or f"{base}.judge.md")
    entries = read_responses(responses)
    for path in (out, cache, report):
        check_can_create(path)
    results = score_responses(entries, args.judge_url, args.judge_model, cache_path=cache, timeout=args.timeout,
                              retries=args.retries, workers=args.workers, max_tokens=args.max_tokens,
                              api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    s = summarize(results)
    png = report.with_suffix(".png")
    mean = "" if s["mean"] is None else f", mean {s['mean']:.1f}"
    plot_scores(s, png, f"{args.judge_model} scores of {responses.name} (n={s['scored']}{mean})")
    lines = summary_lines(s)
    head = ["# LLM-as-judge report", "", f"- **responses**: {responses}",
            f"- **judge**: {args.judge_model} at {chat_url(args.judge_url)}"]
    atomic_write_text(report, "\n".join([*head, *lines, "", f"![score distribution]({png.name})", ""]))
    print0("\n".join(lines))
    print0(f"wrote {out}, {report} and {png}")
    return 0
