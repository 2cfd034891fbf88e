"""`vlm-orpo chat`: a Gradio chat with images against any OpenAI-compatible endpoint (vLLM's, say).

Compare mode asks two endpoints (base and tuned) the same image and question and streams both answers side by
side; the user picks the better one, editing it first if they like, and the judgment is appended to a JSONL
file in RLAIF-V's schema that `vlm-orpo train` reads as data. That closes the loop: serve, judge, train again.

Safe by default: it binds 127.0.0.1, takes uploaded images and `data:` URLs only (it never fetches a remote
URL, not even one sent through Gradio's API), caps upload size, and with an API key it asks for that key
before anything (Gradio's login) and sends it to the endpoints.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from vlm_orpo.config import ConfigError, positive_int
from vlm_orpo.data.sources import RLAIF_V_COLUMNS
from vlm_orpo.errors import BadRow
from vlm_orpo.images import open_image, png_bytes, png_data_url
from vlm_orpo.deploy.sidecar import check_port_free, is_loopback

log = logging.getLogger(__name__)

API_KEY_ENV = "VLM_ORPO_API_KEY"
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,[A-Za-z0-9+/]+={0,2}")
REMOTE = re.compile(r"^(https?|ftp)://", re.IGNORECASE)


HELP = 'Gradio chat against an OpenAI-compatible endpoint; compare and judge'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--compare", metavar="URL2", help="a second endpoint: ask both, show both, pick the better")
    parser.add_argument("--judgments", metavar="FILE.jsonl", help="compare mode: append judgments here "
                        "(RLAIF-V schema, images saved beside it; default judgments.jsonl)")
    parser.add_argument("--model", help="model name at --endpoint (default: the first it lists)")
    parser.add_argument("--compare-model", help="model name at --compare (default: the first it lists)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"asked for by the UI (log in with any name and this password) and sent to the "
                        f"endpoints (env {API_KEY_ENV}; default: none)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image accepted")
    parser.add_argument("--max-tokens", type=positive_int, default=512, help="answer length cap")
    parser.add_argument("--temperature", type=float, default=0.0)


# ---------------------------------------------------------------- images: uploads and data URLs, never remote


class ImageRejected(ValueError):
    """An input image we refuse (remote URL, too large, not an image): shown to the user as a message."""


def load_image(value, max_bytes: int):
    """A PIL image from an uploaded file's path or a `data:image/...;base64,` URL; remote URLs are refused."""
    if isinstance(value, dict):  # Gradio's FileData / message file part
        value = value.get("path") or value.get("url")
    text = str(value or "").strip()
    if not text:
        raise ImageRejected("no image")
    if REMOTE.match(text):
        raise ImageRejected("remote image URLs are not fetched: upload the image or paste it as a data URL")
    if text.startswith("data:"):
        if not DATA_URL.fullmatch(text):
            raise ImageRejected("only base64 data:image/... URLs are accepted")
        if len(text) * 3 // 4 > max_bytes + 3:
            raise ImageRejected(f"image is larger than {max_bytes // 2**20} MB")
        raw = base64.b64decode(text.split(",", 1)[1], validate=False)
    else:
        path = Path(text)
        if path.stat().st_size > max_bytes:
            raise ImageRejected(f"image is larger than {max_bytes // 2**20} MB")
        raw = path.read_bytes()
    if len(raw) > max_bytes:
        raise ImageRejected(f"image is larger than {max_bytes // 2**20} MB")
    try:
        return open_image(raw)
    except BadRow as exc:
        raise ImageRejected(f"not a readable image ({exc})") from None


def split_data_urls(text: str) -> tuple[str, list[str]]:
    """Text with pasted `data:image` URLs taken out, and those URLs."""
    found = DATA_URL.findall(text or "")
    for url in found:
        text = text.replace(url, " ")
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in (text or "").splitlines())
    return "\n".join(lines).strip(), found  # line breaks are the user's: kept


# ---------------------------------------------------------------- the endpoint


class Endpoint:
    """One OpenAI-compatible server and the model it answers with."""

    def __init__(self, url: str, model: str | None, api_key: str | None, max_tokens: int, temperature: float):
        from openai import OpenAI

        self.url = url
        self._model = model
        self.client = OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=1, timeout=120)
        self.max_tokens = max_tokens
        self.temperature = temperature

    @property
    def model(self) -> str:
        if self._model is None:  # asked on first use: the server may start after the UI
            models = self.client.models.list().data
            if not models:
                raise RuntimeError(f"{self.url} lists no models")
            self._model = models[0].id
        return self._model

    def stream(self, messages: list[dict]) -> Iterator[str]:
        """The answer so far, after each streamed chunk."""
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                yield text


def user_message(text: str, images: list) -> dict:
    """An OpenAI chat message with the images inline (as data URLs) before the text."""
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def history_messages(history: list[dict], max_bytes: int) -> list[dict]:
    """Gradio's chat history (text and file parts) as OpenAI messages."""
    messages = []
    for turn in history:
        content = turn.get("content")
        parts = content if isinstance(content, list) else [content]
        texts, images = [], []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif isinstance(part, dict) and (part.get("type") == "file" or "path" in part):
                images.append(load_image(part.get("file", part), max_bytes))
        text = "\n".join(t for t in texts if t)
        if turn.get("role") == "user":
            messages.append(user_message(text, images) if images else {"role": "user", "content": text})
        elif turn.get("role") == "assistant":
            messages.append({"role": "assistant", "content": text})
    return messages


# ---------------------------------------------------------------- judgments: RLAIF-V rows that `train` reads


class JudgmentLog:
    """Appends judgments to a JSONL file; each image is saved once, as PNG, in a folder beside it.

    Rows use RLAIF-V's columns (image, question, chosen, rejected, idx) and keep the image as a path relative
    to the file, so the file and its folder can be moved together and given to `vlm-orpo train` as data.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.image_dir = self.path.with_name(self.path.stem + "_images")
        self._lock = threading.Lock()

    def append(self, image, question: str, chosen: str, rejected: str, **extra) -> dict:
        data = png_bytes(image)
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        fields = {"image": f"{self.image_dir.name}/{name}", "question": question, "chosen": chosen, "rejected": rejected}
        row = {"idx": uuid.uuid4().hex, **{RLAIF_V_COLUMNS[k]: v for k, v in fields.items()}, **extra}
        with self._lock:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            if not (self.image_dir / name).exists():
                (self.image_dir / name).write_bytes(data)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return row


# ---------------------------------------------------------------- the app


def _upload_only(component_cls):
    """A Gradio input that refuses http(s) paths: Gradio would download a URL sent through its API."""
    from abc import ABCMeta

    import gradio as gr
    from gradio_client.utils import is_http_url_like

    def refuse(path):
        if path is not None and is_http_url_like(str(path)):
            raise gr.Error("remote URLs are not fetched: upload the image or paste it as a data URL")

    def move(self, url_or_file_path):
        refuse(url_or_file_path)
        return component_cls.move_resource_to_block_cache(self, url_or_file_path)

    async def async_move(self, url_or_file_path):
        refuse(url_or_file_path)
        return await component_cls.async_move_resource_to_block_cache(self, url_or_file_path)

    name = f"UploadOnly{component_cls.__name__}"
    attrs = {
        "is_template": True,  # rendered as the parent component
        "move_resource_to_block_cache": move,
        "async_move_resource_to_block_cache": async_move,
        "__module__": __name__,
        "__qualname__": name,
    }
    # Gradio's ComponentMeta.__new__ adds nothing a subclass without events needs, but writes a .pyi stub beside
    # the module that defines it (here, into the installed package): so build the class with ABCMeta's.
    return ABCMeta.__new__(type(component_cls), name, (component_cls,), attrs)


def check_key(api_key: str):
    """Gradio's `auth`: any user name, the API key as the password."""
    return lambda _user, password: hmac.compare_digest(str(password).encode(), api_key.encode())


def build_app(
    endpoint: Endpoint, compare: Endpoint | None = None, judgments: str | Path | None = None,
    max_upload_mb: float = 10.0,
):
    import gradio as gr

    max_bytes = int(max_upload_mb * 2**20)
    title = "vlm-orpo chat"
    if compare is None:
        with gr.Blocks(title=title, analytics_enabled=False) as app:  # no calls home
            gr.Markdown(f"### {title} · `{endpoint.url}`")
            _chat(endpoint, max_bytes)
        return app
    log_file = JudgmentLog(judgments or "judgments.jsonl")
    with gr.Blocks(title=title, analytics_enabled=False) as app:  # no calls home
        gr.Markdown(f"### {title} · compare · judgments → `{log_file.path}`")
        _compare(endpoint, compare, log_file, max_bytes)
    return app


def _chat(endpoint: Endpoint, max_bytes: int) -> None:
    import gradio as gr

    def respond(message: dict, history: list[dict]):
        text, pasted = split_data_urls(message.get("text", ""))
        try:
            images = [load_image(f, max_bytes) for f in [*message.get("files", []), *pasted]]
            messages = [*history_messages(history, max_bytes), user_message(text, images)]
        except ImageRejected as exc:
            raise gr.Error(str(exc)) from None
        try:
            yield from endpoint.stream(messages)
        except Exception as exc:  # noqa: BLE001 - the endpoint's failure is the user's message, not a crash
            raise gr.Error(f"{endpoint.url}: {type(exc).__name__}: {exc}") from None

    textbox = _upload_only(gr.MultimodalTextbox)(
        file_types=["image"], placeholder="Ask about an image (upload, drop, or paste a data: URL)",
        elem_id="chat-input",
    )
    gr.ChatInterface(respond, multimodal=True, textbox=textbox, chatbot=gr.Chatbot(elem_id="chatbot", height=420),
                     analytics_enabled=False)


def _compare(a: Endpoint, b: Endpoint, log_file: JudgmentLog, max_bytes: int) -> None:
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            image_in = _upload_only(gr.Image)(type="filepath", sources=["upload", "clipboard"], label="Image",
                                              elem_id="image", height=260)
            question = gr.Textbox(label="Question", lines=2, elem_id="question")
            ask = gr.Button("Ask both", variant="primary", elem_id="ask")
        with gr.Column(scale=2), gr.Row():
            boxes, picks = [], []
            for side, ep in (("A", a), ("B", b)):
                with gr.Column():
                    boxes.append(gr.Textbox(label=f"{side} · {ep.url}", lines=10, interactive=True,
                                            elem_id=f"answer-{side.lower()}"))
                    picks.append(gr.Button(f"{side} is better", interactive=False, elem_id=f"pick-{side.lower()}"))
    status = gr.Markdown(elem_id="status")
    asked = gr.State(None)  # what was asked and the answers as the models gave them

    def run(image_value, question_text):
        text, pasted = split_data_urls(question_text)
        if not text:  # a pasted image alone is no question, and train would skip its judgment
            raise gr.Error("type a question")
        try:
            image = load_image(image_value or (pasted[0] if pasted else None), max_bytes)
        except ImageRejected as exc:
            raise gr.Error(str(exc)) from None
        messages = [user_message(text, [image])]
        answers, errors, updates = ["", ""], [None, None], queue.Queue()

        def worker(i: int, endpoint: Endpoint) -> None:
            try:
                for answer in endpoint.stream(messages):
                    updates.put((i, answer))
            except Exception as exc:  # noqa: BLE001 - shown in that side's box
                errors[i] = f"[{endpoint.url}: {type(exc).__name__}: {exc}]"
            updates.put((i, None))

        for i, endpoint in enumerate((a, b)):
            threading.Thread(target=worker, args=(i, endpoint), daemon=True).start()
        locked = gr.update(interactive=False)
        running = 2
        while running:
            i, answer = updates.get()
            if answer is None:
                running -= 1
            else:
                answers[i] = answer
            yield answers[0], answers[1], None, locked, locked, "answering…"
        ok = not any(errors) and all(s.strip() for s in answers)
        models = [a.model, b.model] if ok else [a.url, b.url]
        shown = [gr.update(value=errors[i] or answers[i], label=f"{'AB'[i]} · {models[i]}") for i in range(2)]
        state = {"image": image, "question": text, "answers": answers, "models": models} if ok else None
        pick = gr.update(interactive=ok)
        yield shown[0], shown[1], state, pick, pick, "pick the better answer (edit it first if you like)" if ok else ""

    def pick(i: int):
        def save(state, text_a, text_b):
            if state is None:
                raise gr.Error("ask first")
            chosen = (text_a, text_b)[i].strip()
            rejected = state["answers"][1 - i].strip()
            if not chosen or chosen == rejected:
                raise gr.Error("the chosen answer is empty or the same as the other one")
            row = log_file.append(
                state["image"], state["question"], chosen, rejected,
                chosen_model=state["models"][i], rejected_model=state["models"][1 - i],
                edited=chosen != state["answers"][i].strip(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            locked = gr.update(interactive=False)
            return None, locked, locked, f"saved judgment `{row['idx'][:8]}`: {'AB'[i]} chosen → `{log_file.path}`"

        return save

    outputs = [*boxes, asked, *picks, status]
    ask.click(run, [image_in, question], outputs)
    question.submit(run, [image_in, question], outputs)
    for i, button in enumerate(picks):
        button.click(pick(i), [asked, *boxes], [asked, *picks, status])


# ---------------------------------------------------------------- the command


def make_endpoints(args) -> tuple[Endpoint, Endpoint | None]:
    for url in filter(None, (args.endpoint, args.compare)):
        if not re.match(r"^https?://", url, re.IGNORECASE):
            raise ConfigError(f"endpoint {url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1")
    common = dict(api_key=args.api_key, max_tokens=args.max_tokens, temperature=args.temperature)
    a = Endpoint(args.endpoint, args.model, **common)
    b = Endpoint(args.compare, args.compare_model, **common) if args.compare else None
    return a, b


def launch_kwargs(args) -> dict:
    """Gradio's own settings for the security defaults: bind address, upload cap, key-as-password login."""
    kwargs = dict(server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 2**20),
                  ssr_mode=False)
    if args.api_key:
        kwargs.update(auth=check_key(args.api_key), auth_message="Any user name; the API key as the password.")
    elif not is_loopback(args.host):
        log.warning("binding %s with no --api-key: anyone who reaches this address can use the endpoints", args.host)
    return kwargs


def run(args) -> None:
    if args.judgments and not args.compare:
        raise ConfigError("--judgments is for compare mode: add --compare URL2")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    try:
        import gradio  # noqa: F401
        import openai  # noqa: F401
    except ImportError:
        raise ConfigError("the chat UI needs gradio and openai: pip install -e '.[ui]'") from None
    a, b = make_endpoints(args)
    check_port_free(args.host, args.port)
    app = build_app(a, b, args.judgments, args.max_upload_mb)
    app.queue().launch(**launch_kwargs(args))
