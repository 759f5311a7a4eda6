"""The chat page in a real browser: headless Chromium (Debian's `chromium`, installed by .ci/run) driven
over the DevTools protocol loads `/` from a live `scratchllm serve`, sends a message, waits for the
streamed answer and compares it with the engine's; then the error display, the stop button and the safe
rendering of markup. Screenshots go to the test's tmp folder. Outside CI, no Chromium = skipped."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request

import pytest
from serve_helpers import KEY, SlowRunner, thread_server
from test_serve import CHATML, HELLO, chat_reference, live, world  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


class Browser:
    """One headless Chromium page, driven with DevTools protocol commands over a websocket."""

    def __init__(self, tmp_path):
        from websockets.sync.client import connect

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        profile = tmp_path / "profile"
        self.proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                      "--window-size=1100,700", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not start its DevTools server")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self._connection = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.ws = self._connection.__enter__()
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}; page: {self.js('document.body.innerText')!r}")

    def screenshot(self, path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self._connection.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture()
def browser(tmp_path):
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        from conftest import need

        need("Chromium", "apt-get install -y chromium (.ci/run installs it)")
    pytest.importorskip("websockets", reason="websockets (dev extra) drives Chromium")
    b = Browser(tmp_path)
    yield b
    b.close()


def open_page(browser, base):
    browser.send("Page.navigate", url=base + "/")
    browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent !== '…'")


def send_message(browser, text: str, temperature: float = 0, max_tokens: int = 30, key: str = "") -> None:
    browser.js(f"""(() => {{
        document.getElementById('temperature').value = {temperature};
        document.getElementById('max_tokens').value = {max_tokens};
        document.getElementById('api_key').value = {json.dumps(key)};
        document.getElementById('input').value = {json.dumps(text)};
        document.getElementById('send').click(); }})()""")


def test_chat_page_streams_an_answer(browser, live, world, tmp_path):  # noqa: F811
    open_page(browser, live)
    assert browser.js("document.getElementById('model').textContent") == "tiny-chat"
    _, (text, _, _) = chat_reference(world, HELLO, 30)
    send_message(browser, "Hello!", key=KEY)
    browser.wait("document.querySelector('.assistant')?.dataset.state === 'done'")
    assert browser.js("document.querySelector('.user').textContent") == "Hello!"
    assert browser.js("document.querySelector('.assistant').textContent") == text
    assert browser.js("document.querySelectorAll('.error').length") == 0
    browser.screenshot(tmp_path / "chat.png")
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second turn sends the whole conversation: the answer is the engine's for [user, assistant, user]
    turn2 = HELLO + [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
    _, (text2, _, _) = chat_reference(world, turn2, 30)
    send_message(browser, "More?", key=KEY)
    browser.wait("document.querySelectorAll('.assistant')[1]?.dataset.state === 'done'")
    assert browser.js("document.querySelectorAll('.assistant')[1].textContent") == text2


def test_chat_page_shows_the_servers_refusal(browser, live, tmp_path):  # noqa: F811
    open_page(browser, live)
    send_message(browser, "Hello!", key="sk-wrong")
    shown = browser.wait("document.querySelector('.error')?.textContent")
    assert "incorrect API key" in shown
    browser.screenshot(tmp_path / "error.png")


def test_chat_page_stop_button_and_safe_rendering(browser, world, tmp_path):  # noqa: F811
    from scratchllm.infer.engine import Engine
    from scratchllm.serve.app import create_app

    engine = Engine(world.model, world.tok)
    engine.runner = SlowRunner(world.model, 0.05)  # 20 tokens/s: the stop button has time to act
    with thread_server(create_app(engine, "slow", chat=CHATML)) as base:
        open_page(browser, base)
        send_message(browser, "Hello!", temperature=1, max_tokens=100)
        browser.wait("document.querySelector('.assistant')?.textContent.length > 0")
        assert browser.js("document.getElementById('stop').disabled") is False
        browser.js("document.getElementById('stop').click()")
        browser.wait("document.querySelector('.assistant').dataset.state === 'done'")
        assert browser.js("document.getElementById('send').disabled") is False
        assert browser.js("document.querySelectorAll('.error').length") == 0
        time.sleep(0.3)
        assert json.loads(urllib.request.urlopen(base + "/health").read())["running"] == 0  # the slot is free
    # model text is never markup: tags stay text, ``` fences become code blocks, newlines are kept
    shown = browser.js("""(() => { const el = document.createElement('div'); el.className = 'msg assistant';
        document.getElementById('log').append(el);
        render(el, 'a <img src=x onerror="window.pwned=1"> b\\n```py\\nx = 1 < 2\\n```\\nend');
        return [el.querySelectorAll('img').length, el.querySelector('pre code').textContent, el.textContent,
                window.pwned === undefined]; })()""")
    assert shown == [0, "x = 1 < 2\n", 'a <img src=x onerror="window.pwned=1"> b\nx = 1 < 2\nend', True]
    browser.screenshot(tmp_path / "stopped.png")
