"""scratchllm.eval.judge against a fake OpenAI-compatible server on 127.0.0.1 (never the internet): the
judge prompt is the book's text word for word; parse_score reads the usual reply shapes; judge URLs are
normalised; `run_judge` writes scores, report and PNG with the right mean and bins, leaving unparsed
replies out of the mean; 500 / 429 are retried, 400 fails at once with the server's message; a dead URL
fails naming it, and the cache (torn last line included) lets a rerun ask only for what is missing;
bad responses lines name file and line."""

import json
import re
import socket
import threading
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scratchllm.common import ScratchError
from scratchllm.eval import judge


class FakeJudge:
    """POST /v1/chat/completions answered with the last word of the model response found in the
    prompt (response "answer 85" -> reply "85"). `fail` holds (status, message) answers given first;
    after `limit` good replies every request gets a 500. `requests` records (path, headers, body)."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.fail: list[tuple[int, str]] = []
        self.limit: int | None = None
        self.answered = 0
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    status, msg = server.fail.pop(0) if server.fail else (200, "")
                    if status == 200 and server.limit is not None and server.answered >= server.limit:
                        status, msg = 500, "gone"
                    server.answered += status == 200
                if status == 200:
                    response = re.search(r"score the model response `(.*)` on a scale", body["messages"][0]["content"],
                                         re.DOTALL)[1]
                    payload = {"choices": [{"message": {"role": "assistant", "content": response.split()[-1]}}]}
                else:
                    payload = {"error": {"message": msg}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(judge, "BACKOFF_BASE", 0.001)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def server():
    with FakeJudge() as s:
        yield s


def entry(i: int, reply: str) -> dict:
    return {"id": f"q{i}", "instruction": f"Task {i}.", "input": "" if i % 2 else f"in {i}", "output": f"ref {i}",
            "response": f"answer {reply}"}


def write_responses(path, entries) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


def args_for(path, url, **kw) -> Namespace:
    d = dict(responses=str(path), judge_url=url, judge_model="judge-1", out=None, cache=None, report=None,
             timeout=5.0, retries=3, workers=1, max_tokens=16, api_key=None)
    return Namespace(**(d | kw))


def score(entries, url, tmp_path, **kw):
    return judge.score_responses(entries, url, "judge-1", cache_path=tmp_path / "cache.jsonl", timeout=5.0,
                                 progress=False, **kw)


def test_prompt_is_the_books_with_and_without_input():
    with_input = {"instruction": "Rewrite the sentence.", "input": "The cake was eaten.",
                  "output": "Someone ate the cake.", "response": "They ate the cake."}
    assert judge.judge_prompt(with_input) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was eaten.` "
        "and correct output `Someone ate the cake.`, score the model response `They ate the cake.` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only.")
    without = with_input | {"input": ""}
    assert judge.judge_prompt(without) == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.` "
        "and correct output `Someone ate the cake.`, score the model response `They ate the cake.` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only.")


@pytest.mark.parametrize("reply, expected", [
    ("85", 85), ("Score: 90.", 90), ("85/100", 85), ("**70**", 70), (" 100\n", 100), ("0", 0),
    ("8/10", 80), ("7 out of 10", 70), ("4 / 5", 80), ("87.5", 88), ("Score: 92 (out of 100)", 92),
    ("150", None), ("-5", None), ("11/10", None), ("3/0", None), ("", None), ("I cannot score this.", None),
])
def test_parse_score(reply, expected):
    assert judge.parse_score(reply) == expected


@pytest.mark.parametrize("url, expected", [
    ("http://h:8080", "http://h:8080/v1/chat/completions"),
    ("http://h:8080/", "http://h:8080/v1/chat/completions"),
    ("http://h:8080/v1", "http://h:8080/v1/chat/completions"),
    ("https://h/v1/", "https://h/v1/chat/completions"),
    ("http://h:8080/v1/chat/completions", "http://h:8080/v1/chat/completions"),
    ("http://h/openai", "http://h/openai/chat/completions"),
])
def test_chat_url(url, expected):
    assert judge.chat_url(url) == expected


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://h/v1", "h/v1"])
def test_chat_url_rejects_non_http(url):
    with pytest.raises(ScratchError, match="not an http"):
        judge.chat_url(url)


def test_run_judge_writes_scores_report_and_png(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    replies = ["85", "Score: 90.", "7/10", "**5**", "100", "no-idea"]
    path = write_responses(tmp_path / "responses.jsonl", [entry(i, r) for i, r in enumerate(replies)])
    assert judge.run_judge(args_for(path, server.url + "/v1", workers=3)) == 0

    rows = [json.loads(line) for line in (tmp_path / "responses.scores.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [85, 90, 70, 5, 100, None]  # entry order despite 3 workers
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)] and rows[1]["judge_reply"] == "90."
    path_, headers, body = server.requests[0]
    assert path_ == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["temperature"] == 0 and body["max_tokens"] == 16
    assert body["seed"] == 123 and len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    assert {r[2]["messages"][0]["content"] for r in server.requests} == {judge.judge_prompt(r) for r in rows}

    report = (tmp_path / "responses.judge.md").read_text()
    mean = (85 + 90 + 70 + 5 + 100) / 5
    assert f"**mean score**: {mean:.2f}" in report and "**median score**: 85" in report
    assert "5 of 6 (1 unparsed reply, left out of the mean" in report and '`"no-idea"`' in report
    assert "| 90-100 |     2 |  40.0% |" in report and "| 0-9    |     1 |  20.0% |" in report
    assert "judge-1 at " + server.url + "/v1/chat/completions" in report
    assert (tmp_path / "responses.judge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"**mean score**: {mean:.2f}" in out and "| 70-79  |     1 |  20.0% | ########" in out
    assert "line 6 (id q5)" in out

    n = len(server.requests)
    judge.run_judge(args_for(path, server.url))  # everything cached: nothing sent
    assert len(server.requests) == n == 6
    judge.run_judge(args_for(path, server.url, judge_model="judge-2"))  # another judge: new keys
    assert len(server.requests) == 12


def test_duplicate_prompts_are_sent_once(tmp_path, server):
    results = score([entry(1, "60"), entry(1, "60")], server.url, tmp_path)
    assert [r["score"] for r in results] == [60, 60] and len(server.requests) == 1


@pytest.mark.parametrize("status", [500, 429])
def test_busy_server_is_retried(tmp_path, server, status):
    server.fail = [(status, "busy"), (503, "loading model")]
    assert score([entry(1, "42")], server.url, tmp_path, retries=2)[0]["score"] == 42
    assert len(server.requests) == 3


def test_bad_request_fails_at_once_with_the_servers_message(tmp_path, server):
    server.fail = [(400, "model 'judge-1' not found")]
    with pytest.raises(ScratchError, match="HTTP 400: model 'judge-1' not found"):
        score([entry(1, "42")], server.url, tmp_path, retries=3)
    assert len(server.requests) == 1


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_dead_url_names_it_and_the_cache_survives(tmp_path, server):
    entries = [entry(i, str(10 * i)) for i in range(5)]
    server.limit = 2  # the server answers two requests, then only 500s
    with pytest.raises(ScratchError, match=r"did not answer after 2 attempts.*2 of 5 entries are scored and cached"):
        score(entries, server.url, tmp_path, retries=1)
    url = closed_port_url()
    with pytest.raises(ScratchError, match=re.escape(url + "/v1/chat/completions") + ".*did not answer after 3"):
        score(entries, url, tmp_path, retries=2)
    server.limit, n = None, len(server.requests)
    assert [r["score"] for r in score(entries, server.url, tmp_path)] == [0, 10, 20, 30, 40]
    assert len(server.requests) - n == 3  # only the missing ones


def test_torn_last_cache_line_is_ignored(tmp_path, server):
    entries = [entry(i, str(i)) for i in range(4)]
    score(entries[:3], server.url, tmp_path)
    cache = tmp_path / "cache.jsonl"
    text = cache.read_text()
    cache.write_text(text[: len(text) - 20])  # a crash in the middle of the third line
    assert [r["score"] for r in score(entries, server.url, tmp_path)] == [0, 1, 2, 3]
    assert len(server.requests) == 3 + 2  # the torn one and the new one
    assert len([json.loads(line) for line in cache.read_text().splitlines()]) == 4


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a"', ""], r"responses.jsonl:1: not valid JSON"),
    ([json.dumps(entry(1, "1")), "[1, 2]"], r"responses.jsonl:2: expected a JSON object, got a list"),
    ([json.dumps(entry(1, "1")), "", json.dumps(entry(2, "2") | {"response": None})],
     r"responses.jsonl:3: field 'response' must be a string"),
    ([json.dumps({k: v for k, v in entry(1, "1").items() if k != "input"})], r"responses.jsonl:1: field 'input' is missing"),
    (["", "  "], r"responses.jsonl holds no responses"),
])
def test_bad_responses_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScratchError, match=message):
        judge.run_judge(args_for(path, "http://127.0.0.1:9"))
