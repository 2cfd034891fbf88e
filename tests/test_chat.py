"""`vlm-orpo chat`: image handling, judgments that `train` reads back, and the Gradio UI driven in headless Chromium.

Two fake OpenAI-compatible servers (stdlib http.server on 127.0.0.1, streaming SSE) stand in for vLLM. The
browser tests use Debian's Chromium through Playwright; without them they skip, unless VLM_ORPO_REQUIRE_UI is
set (CI sets it after `bash scripts/setup_ui_test_env.sh`), where a missing piece fails instead.
Set VLM_ORPO_UI_SCREENSHOT=PATH to save the compare-mode screenshot (docs/ui.png comes from it).
"""

from __future__ import annotations

import importlib

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

REQUIRE_UI = bool(os.environ.get("VLM_ORPO_REQUIRE_UI"))
CHROMIUM = os.environ.get("VLM_ORPO_CHROMIUM", "/usr/bin/chromium")
KEY = "test-key-123"


def need(module: str):
    if REQUIRE_UI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} not installed (bash scripts/setup_ui_test_env.sh)")


need("gradio")
need("openai")

from vlm_orpo.deploy import chat as ui  # noqa: E402
from vlm_orpo.config import ConfigError  # noqa: E402


class FakeOpenAI:
    """An OpenAI-compatible server with one model and one answer, streamed word by word as SSE."""

    def __init__(self, model: str, answer: str, api_key: str | None = KEY):
        self.model, self.answer, self.api_key, self.requests = model, answer, api_key, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send_json(401, {"error": {"message": "invalid api key"}})
                    return False
                return True

            def do_GET(self):
                fake.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                if not self._authorized():
                    return
                if self.path.rstrip("/") != "/v1/models":
                    return self._send_json(404, {"error": {"message": "not found"}})
                self._send_json(200, {"object": "list", "data": [
                    {"id": fake.model, "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"method": "POST", "path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                if not self._authorized():
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, word in enumerate(fake.answer.split(" ")):
                    delta = {"content": (" " if i else "") + word}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": fake.model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.02)
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def endpoints():
    base = FakeOpenAI("base-model", "A red square, I think.")
    tuned = FakeOpenAI("tuned-model", "The image shows a solid red rectangle.")
    yield base, tuned
    base.close()
    tuned.close()


@pytest.fixture
def red_png(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (220, 30, 30)).save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ui.add_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------- no browser


def test_images_come_from_uploads_and_data_urls_only(red_png, endpoints):
    base, _ = endpoints
    limit = 2**20
    assert ui.load_image(str(red_png), limit).size == (96, 64)
    assert ui.load_image({"path": str(red_png)}, limit).size == (96, 64)
    assert ui.load_image(data_url(red_png), limit).size == (96, 64)
    seen = len(base.requests)
    for url in (base.url.replace("/v1", "/red.png"), "https://example.com/cat.png"):
        with pytest.raises(ui.ImageRejected, match="not fetched"):
            ui.load_image(url, limit)
    assert len(base.requests) == seen, "a remote URL was fetched"
    with pytest.raises(ui.ImageRejected, match="larger than"):
        ui.load_image(str(red_png), 100)
    with pytest.raises(ui.ImageRejected, match="larger than"):
        ui.load_image(data_url(red_png), 100)
    not_image = red_png.with_suffix(".txt")
    not_image.write_text("hello")
    with pytest.raises(ui.ImageRejected, match="not a readable image"):
        ui.load_image(str(not_image), limit)
    text, urls = ui.split_data_urls(f"what is this? {data_url(red_png)} thanks")
    assert text == "what is this? thanks" and urls == [data_url(red_png)]
    assert ui.split_data_urls(f"first line\n  second {data_url(red_png)}  line ") == (
        "first line\nsecond line", [data_url(red_png)])


def test_gradio_inputs_refuse_remote_paths(endpoints):
    """Gradio downloads a URL given as a file path through its API; our inputs refuse before any fetch."""
    import gradio as gr

    base, _ = endpoints
    seen = len(base.requests)
    for cls in (gr.Image, gr.MultimodalTextbox):
        component = ui._upload_only(cls)()
        assert component.get_block_name() == cls.__name__.lower()  # rendered as the stock component
        url = base.url.replace("/v1", "/image.png")
        with pytest.raises(gr.Error, match="not fetched"):
            asyncio.run(component.async_move_resource_to_block_cache(url))
        with pytest.raises(gr.Error, match="not fetched"):
            component.move_resource_to_block_cache(url)
    assert len(base.requests) == seen


def test_endpoint_streams_with_key_and_inline_image(endpoints, red_png):
    base, _ = endpoints
    endpoint = ui.Endpoint(base.url, None, KEY, max_tokens=16, temperature=0.0)
    image = ui.load_image(str(red_png), 2**20)
    parts = list(endpoint.stream([ui.user_message("what?", [image])]))
    assert parts[-1] == base.answer and len(parts) == len(base.answer.split())
    assert endpoint.model == "base-model"  # asked from /v1/models
    request = base.chat_requests()[-1]
    assert request["auth"] == f"Bearer {KEY}" and request["body"]["stream"] is True
    content = request["body"]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "what?"}
    wrong = ui.Endpoint(base.url, "base-model", "wrong", max_tokens=16, temperature=0.0)
    with pytest.raises(Exception, match="401|invalid api key"):
        list(wrong.stream([{"role": "user", "content": "hi"}]))


def test_history_becomes_openai_messages(red_png):
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(red_png)}}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "and now?"},
    ]
    messages = ui.history_messages(history, 2**20)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0]["type"] == "image_url" and messages[0]["content"][1]["text"] == "hi"
    assert messages[1] == {"role": "assistant", "content": "hello"}
    assert messages[2] == {"role": "user", "content": "and now?"}


def test_judgments_are_training_data(tmp_path, red_png):
    """Rows appended by the UI load through `prepare_data`, the loader `train` uses, images and all."""
    from vlm_orpo.data.sources import prepare_data
    from vlm_orpo.images import open_image

    log = ui.JudgmentLog(tmp_path / "runs" / "judgments.jsonl")
    image = Image.open(red_png).convert("RGB")
    log.append(image, "What color is it?", "Red.", "Blue.", chosen_model="tuned", rejected_model="base",
               edited=False, created="now")
    log.append(image, "Describe it.", "A red rectangle.", "A circle.", chosen_model="base", rejected_model="tuned",
               edited=True, created="now")
    assert len(list(log.image_dir.iterdir())) == 1  # the same image is stored once
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "runs"), moved)  # the file and its image folder travel together
    data = prepare_data(str(moved / "judgments.jsonl"))
    rows = data.train
    assert data.report.total_skipped == 0 and len(rows) == 2
    assert [rows[i]["question"] for i in range(2)] == ["What color is it?", "Describe it."]
    pairs = [(rows[i]["chosen"], rows[i]["rejected"]) for i in range(2)]
    assert pairs == [("Red.", "Blue."), ("A red rectangle.", "A circle.")]
    assert open_image(rows[0]["image"], rows.base_dir).size == (96, 64)


def test_wilson_interval():
    assert ui.wilson_interval(0, 0) is None
    low, high = ui.wilson_interval(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4  # the textbook value for 5 of 10
    low, high = ui.wilson_interval(10, 10)
    assert abs(low - 0.7225) < 1e-4 and high == 1.0
    assert ui.wilson_interval(0, 3)[0] == 0.0


def test_ties_and_both_bad_are_recorded_and_tallied_but_are_not_training_pairs(tmp_path, red_png):
    from vlm_orpo.data.sources import prepare_data

    log = ui.JudgmentLog(tmp_path / "judgments.jsonl")
    image = Image.open(red_png).convert("RGB")
    pair = ("base", "tuned")
    log.append(image, "Color?", "Red.", "Blue.", chosen_model="tuned", rejected_model="base", swapped=True)
    log.append(image, "Shape?", "A square.", "A circle.", chosen_model="tuned", rejected_model="base", swapped=False)
    log.append(image, "Size?", "Small.", "Huge.", chosen_model="base", rejected_model="tuned", swapped=True)
    log.append(image, "Other pair?", "Yes.", "No.", chosen_model="tuned", rejected_model="someone-else", swapped=True)
    log.append(image, "Not blind?", "Yes.", "No.", chosen_model="base", rejected_model="tuned")  # an older row
    log.append_unpaired("tie", image, "Color?", ["Red.", "Red!"], ["tuned", "base"], swapped=True)
    log.append_unpaired("both_bad", image, "Count?", ["Three.", "Five."], ["base", "tuned"], swapped=False)
    with pytest.raises(ValueError):
        log.append_unpaired("a", image, "?", ["x", "y"], ["base", "tuned"])
    assert log.unpaired_path == tmp_path / "judgments.unpaired.jsonl"
    assert [json.loads(line)["verdict"] for line in log.unpaired_path.read_text().splitlines()] == ["tie", "both_bad"]

    data = prepare_data(str(log.path))  # what `vlm-orpo train data.source=judgments.jsonl` loads
    assert data.report.total_skipped == 0 and len(data.train) == 5
    assert "Count?" not in [data.train[i]["question"] for i in range(5)]

    tally = log.write_tally(pair)
    assert json.loads(log.tally_path.read_text()) == json.loads(json.dumps(tally))
    assert log.tally_path == tmp_path / "judgments.tally.json"
    assert tally["wins"] == {"base": 1, "tuned": 2} and tally["ties"] == 1 and tally["both_bad"] == 1
    assert tally["decisive"] == 3 and tally["judgments"] == 5  # not: against someone-else, or not judged blind
    assert tally["win_rate"]["tuned"]["rate"] == pytest.approx(2 / 3)
    assert tally["win_rate"]["tuned"]["ci95"] == pytest.approx(list(ui.wilson_interval(2, 3)))
    assert "`tuned` 2 wins" in ui.tally_text(tally) and "1 tie," in ui.tally_text(tally)


def test_judgments_encode_for_training_from_any_folder(tmp_path, red_png, tiny_processor, monkeypatch):
    from vlm_orpo.data.packing import PairEncoder
    from vlm_orpo.data.sources import prepare_data

    log = ui.JudgmentLog(tmp_path / "data" / "judgments.jsonl")
    log.append(Image.open(red_png).convert("RGB"), "What color is it?", "Red.", "Blue.")
    monkeypatch.chdir(tmp_path)  # not the data folder
    rows = prepare_data(str(log.path)).train
    assert PairEncoder(tiny_processor).encode(rows[0]).prompt_ids


def test_security_defaults_and_argument_errors(endpoints):
    base, tuned = endpoints
    args = chat_args("--endpoint", base.url)
    kwargs = ui.launch_kwargs(args)
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["max_file_size"] == 10 * 2**20
    assert "auth" not in kwargs
    kwargs = ui.launch_kwargs(chat_args("--endpoint", base.url, "--api-key", KEY, "--max-upload-mb", "2"))
    assert kwargs["max_file_size"] == 2 * 2**20
    assert kwargs["auth"]("anyone", KEY) and not kwargs["auth"]("anyone", "nope")
    with pytest.raises(ConfigError, match="--compare"):
        ui.run(chat_args("--endpoint", base.url, "--judgments", "j.jsonl"))
    with pytest.raises(ConfigError, match="http"):
        ui.run(chat_args("--endpoint", "file:///etc/passwd"))
    with pytest.raises(ConfigError, match="http"):
        ui.run(chat_args("--endpoint", "ftp://127.0.0.1/v1"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            ui.run(chat_args("--endpoint", base.url, "--port", str(port)))


# ---------------------------------------------------------------- the app, served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str]):
    args = chat_args(*argv, "--port", str(free_port()))
    a, b = ui.make_endpoints(args)
    app = ui.build_app(a, b, args.judgments, args.max_upload_mb, args.seed)
    app.queue().launch(prevent_thread_lock=True, quiet=True, **ui.launch_kwargs(args))
    return app, f"http://127.0.0.1:{args.port}"


def test_served_app_asks_for_the_key_and_fetches_no_url(endpoints, tmp_path):
    import httpx

    base, tuned = endpoints
    app, url = serve(["--endpoint", base.url, "--compare", tuned.url, "--judgments", str(tmp_path / "j.jsonl"),
                      "--api-key", KEY])
    try:
        assert httpx.get(f"{url}/config").status_code == 401
        assert httpx.post(f"{url}/gradio_api/call/run", json={"data": [None, "hi"]}).status_code == 401
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/login", data={"username": "me", "password": "nope"}).status_code == 400
            assert client.post("/login", data={"username": "me", "password": KEY}).status_code == 200
            assert client.get("/config").status_code == 200
            # through Gradio's API, an image given as a URL (here one our fake server would answer) is refused
            seen = len(base.requests) + len(tuned.requests)
            remote = {"path": base.url.replace("/v1", "/cat.png"), "meta": {"_type": "gradio.FileData"}}
            event = client.post("/gradio_api/call/run", json={"data": [remote, "what is it?"]}).json()["event_id"]
            result = client.get(f"/gradio_api/call/run/{event}").text
            assert "event: error" in result and "not fetched" in result
            assert len(base.requests) + len(tuned.requests) == seen
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if REQUIRE_UI:
            pytest.fail(f"VLM_ORPO_REQUIRE_UI is set but {CHROMIUM} is missing (bash scripts/setup_ui_test_env.sh)")
        pytest.skip(f"no Chromium at {CHROMIUM} (bash scripts/setup_ui_test_env.sh)")
    sync_api = need("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield chromium
        chromium.close()


def login(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.get_by_label("username").fill("me")
    page.get_by_label("password").fill(KEY)
    page.get_by_role("button", name="Login").click()
    return page


def test_chat_in_the_browser(browser, endpoints, red_png):
    """Upload an image, ask, see the streamed answer; the endpoint got the image inline and the key."""
    base, _ = endpoints
    app, url = serve(["--endpoint", base.url, "--api-key", KEY])
    try:
        page = login(browser, url)
        page.locator("#chat-input input[type=file]").set_input_files(str(red_png))
        page.locator("#chat-input textarea").fill("What is in this picture?")
        page.locator("#chat-input textarea").press("Enter")
        page.locator("#chatbot").get_by_text(base.answer).wait_for()
        request = base.chat_requests()[-1]
        assert request["auth"] == f"Bearer {KEY}"
        parts = request["body"]["messages"][-1]["content"]
        assert parts[-1]["text"] == "What is in this picture?"
        sent = base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(sent)).size == (96, 64)
        # a follow-up carries the conversation, the image included
        page.locator("#chat-input textarea").fill("Are you sure?")
        page.locator("#chat-input textarea").press("Enter")
        page.locator("#chatbot").get_by_text(base.answer).nth(1).wait_for()
        messages = base.chat_requests()[-1]["body"]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[0]["content"][0]["type"] == "image_url" and messages[1]["content"] == base.answer
        assert messages[2]["content"][-1]["text"] == "Are you sure?"
        page.close()
    finally:
        app.close()


def orders(seed: int, n: int) -> list[bool]:
    """Whether each of the first n questions shows the --compare endpoint as A (what the app draws, in order)."""
    import random

    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def seed_for(swaps: list[bool]) -> int:
    return next(seed for seed in range(1000) if orders(seed, len(swaps)) == swaps)


def ask(page, a_ends: str, b_ends: str) -> None:
    """Ask both (image and question already filled in) and wait until both answers are in and pickable."""
    page.locator("#ask").click()
    for side, end in (("a", a_ends), ("b", b_ends)):
        page.wait_for_function("([s, e]) => document.querySelector(s).value.endsWith(e)",
                               arg=[f"#answer-{side} textarea", end])
    page.locator("#pick-a:enabled").wait_for()


def labels(page) -> list[str]:
    return [page.locator(f"#answer-{side} [data-testid=block-info]").inner_text().strip() for side in "ab"]


def test_compare_and_judge_in_the_browser(browser, endpoints, red_png, tmp_path, monkeypatch):
    """Ask both endpoints, pick one, then edit an answer and pick it: two rows `train` can read."""
    from vlm_orpo.data.sources import prepare_data
    from vlm_orpo.images import open_image

    base, tuned = endpoints
    monkeypatch.chdir(tmp_path)
    judgments = tmp_path / "judgments.jsonl"
    seed = seed_for([False, False])  # the --endpoint model shown as A both times
    app, url = serve(["--endpoint", base.url, "--compare", tuned.url, "--judgments", "judgments.jsonl",
                      "--api-key", KEY, "--seed", str(seed)])
    try:
        page = login(browser, url)
        page.locator("#image input[type=file]").set_input_files(str(red_png))
        page.locator("#question textarea").fill("What color is the shape?")
        ask(page, "I think.", "rectangle.")
        assert page.locator("#answer-b textarea").input_value() == tuned.answer
        if os.environ.get("VLM_ORPO_UI_SCREENSHOT"):
            page.screenshot(path=os.environ["VLM_ORPO_UI_SCREENSHOT"])
        page.locator("#pick-b").click()
        page.locator("#status").get_by_text("saved judgment").wait_for()
        assert page.locator("#pick-a").is_disabled() and page.locator("#pick-tie").is_disabled()  # one per question

        ask(page, "I think.", "rectangle.")  # same image and question; this time fix A's answer and pick it
        page.locator("#answer-a textarea").fill("A solid red rectangle.")
        page.locator("#pick-a").click()
        page.wait_for_function("() => document.querySelectorAll('#status').length && "
                               "document.querySelector('#status').innerText.includes('A (base-model) chosen')")
        page.close()
    finally:
        app.close()

    rows = [json.loads(line) for line in judgments.read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["chosen"] == tuned.answer and rows[0]["rejected"] == base.answer
    assert rows[0]["chosen_model"] == "tuned-model" and not rows[0]["edited"]
    assert rows[1]["chosen"] == "A solid red rectangle." and rows[1]["rejected"] == tuned.answer
    assert rows[1]["edited"] and rows[0]["question"] == "What color is the shape?"
    data = prepare_data(str(judgments))
    assert data.report.total_skipped == 0 and len(data.train) == 2
    assert open_image(data.train[0]["image"], data.train.base_dir).size == (96, 64)


def test_blind_ab_in_the_browser(browser, endpoints, red_png, tmp_path):
    """Seeded random order per question; the models are named only after the pick; a tie and a both-bad are
    recorded (and tallied) but are not training pairs; the tally shows in the page and in judgments.tally.json."""
    from vlm_orpo.data.sources import prepare_data

    base, tuned = endpoints
    judgments = tmp_path / "judgments.jsonl"
    swaps = [True, False, True, False]  # tuned shown as A in questions 1 and 3
    app, url = serve(["--endpoint", base.url, "--compare", tuned.url, "--judgments", str(judgments),
                      "--api-key", KEY, "--seed", str(seed_for(swaps))])
    ends = {False: ("I think.", "rectangle."), True: ("rectangle.", "I think.")}
    picks = ["a", "a", "tie", "both-bad"]  # tuned wins, base wins, a tie, both bad
    try:
        page = login(browser, url)
        page.locator("#image input[type=file]").set_input_files(str(red_png))
        page.locator("#question textarea").fill("What color is the shape?")
        for question, (swapped, pick) in enumerate(zip(swaps, picks)):
            ask(page, *ends[swapped])
            shown = [base.answer, tuned.answer][::-1 if swapped else 1]
            assert [page.locator(f"#answer-{s} textarea").input_value() for s in "ab"] == shown
            assert labels(page) == ["A", "B"], "the names are hidden until the pick"
            hidden_from = page.content() if question == 0 else page.locator("#status").inner_text() + str(labels(page))
            assert "base-model" not in hidden_from and "tuned-model" not in hidden_from  # (the tally names both)
            page.locator(f"#pick-{pick}").click()
            page.locator("#status").get_by_text("saved judgment").nth(0).wait_for()
            page.wait_for_function("n => document.querySelector('#tally').innerText.includes(n + ' judged')",
                                   arg=question + 1)
            models = ["tuned-model", "base-model"] if swapped else ["base-model", "tuned-model"]
            assert labels(page) == [f"A · {models[0]}", f"B · {models[1]}"], "named after the pick"
            saved_to = "judgments.unpaired.jsonl" if pick in ("tie", "both-bad") else "judgments.jsonl"
            assert page.locator("#status").inner_text().endswith(saved_to)
        tally_shown = page.locator("#tally").inner_text()
        page.close()
    finally:
        app.close()

    rows = [json.loads(line) for line in judgments.read_text().splitlines()]
    assert [(r["chosen_model"], r["chosen_side"], r["swapped"]) for r in rows] == [
        ("tuned-model", "A", True), ("base-model", "A", False)]
    unpaired = [json.loads(line) for line in (tmp_path / "judgments.unpaired.jsonl").read_text().splitlines()]
    assert [(r["verdict"], r["models"], r["answers"][0]) for r in unpaired] == [
        ("tie", ["tuned-model", "base-model"], tuned.answer), ("both_bad", ["base-model", "tuned-model"], base.answer)]
    assert (tmp_path / unpaired[0]["image"]).is_file()
    data = prepare_data(str(judgments))  # what training reads: the two wins only
    assert data.report.total_skipped == 0 and len(data.train) == 2

    tally = json.loads((tmp_path / "judgments.tally.json").read_text())
    low, high = ui.wilson_interval(1, 2)
    assert tally == {
        "models": ["base-model", "tuned-model"], "judgments": 4, "wins": {"base-model": 1, "tuned-model": 1},
        "ties": 1, "both_bad": 1, "decisive": 2,
        "win_rate": {m: {"rate": 0.5, "ci95": [low, high]} for m in ("base-model", "tuned-model")},
        "interval": "Wilson score, 95%, over the decisive judgments",
    }
    assert "base-model 1 win, tuned-model 1 win, 1 tie, 1 both bad" in tally_shown
    assert f"50% (95% CI {low:.0%}–{high:.0%})" in tally_shown
