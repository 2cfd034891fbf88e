"""`vlm-orpo chat`: a Gradio chat with images against any OpenAI-compatible endpoint (vLLM's, say).

Compare mode asks two endpoints (base and tuned) the same image and question and streams both answers side by
side, blind: the sides are shuffled per question and the models are named only after the pick. The user picks A
or B, editing it first if they like, and the judgment is appended to a JSONL file in RLAIF-V's schema that
`vlm-orpo train` reads as data. That closes the loop: serve, judge, train again. A tie or "both bad" is recorded
in a file beside it that training does not read, and a running tally (wins per model, ties, both bad, each
model's win rate over the decisive judgments with a 95% Wilson interval) is shown and written beside it too.

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
import math
import os
import queue
import random
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
    parser.add_argument("--seed", type=int, help="compare mode: seed of the per-question A/B order (default: unseeded)")
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


TIE, BOTH_BAD = "tie", "both_bad"


def wilson_interval(wins: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (95% with z = 1.96); None without trials."""
    if n <= 0:
        return None
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class JudgmentLog:
    """Appends judgments to a JSONL file; each image is saved once, as PNG, in a folder beside it.

    Rows use RLAIF-V's columns (image, question, chosen, rejected, idx) and keep the image as a path relative
    to the file, so the file and its folder can be moved together and given to `vlm-orpo train` as data. A tie or
    "both bad" is no preference pair: it goes to `NAME.unpaired.jsonl` beside the file (training is given the
    file, not this one), and `NAME.tally.json` holds the running tally of both.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.image_dir = self.path.with_name(self.path.stem + "_images")
        self.unpaired_path = self.path.with_name(self.path.stem + ".unpaired.jsonl")
        self.tally_path = self.path.with_name(self.path.stem + ".tally.json")
        self._lock = threading.Lock()

    def _image(self, image) -> str:
        """Save the image once (called under the lock); its path relative to the file."""
        data = png_bytes(image)
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        if not (self.image_dir / name).exists():
            (self.image_dir / name).write_bytes(data)
        return f"{self.image_dir.name}/{name}"

    def _write(self, path: Path, row: dict) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def append(self, image, question: str, chosen: str, rejected: str, **extra) -> dict:
        """A preference pair: a row `vlm-orpo train` reads."""
        with self._lock:
            fields = {"image": self._image(image), "question": question, "chosen": chosen, "rejected": rejected}
            row = {"idx": uuid.uuid4().hex, **{RLAIF_V_COLUMNS[k]: v for k, v in fields.items()}, **extra}
            self._write(self.path, row)
        return row

    def append_unpaired(self, verdict: str, image, question: str, answers: list[str], models: list[str],
                        **extra) -> dict:
        """A tie or "both bad": recorded with both answers, outside the training file."""
        if verdict not in (TIE, BOTH_BAD):
            raise ValueError(f"verdict must be {TIE!r} or {BOTH_BAD!r}, got {verdict!r}")
        with self._lock:
            row = {"idx": uuid.uuid4().hex, "verdict": verdict, "image": self._image(image), "question": question,
                   "answers": answers, "models": models, **extra}
            self._write(self.unpaired_path, row)
        return row

    def tally(self, models: tuple[str, str]) -> dict:
        """Wins per model, ties and both-bad over the blind judgments (rows with `swapped`) between these two
        models, and each model's win rate over the decisive ones (a tie or both-bad is no win for either) with its
        95% Wilson interval."""
        pair = set(models)
        wins, ties, both_bad = {m: 0 for m in models}, 0, 0
        for path in (self.path, self.unpaired_path):
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            for line in filter(str.strip, lines):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn line of a killed writer
                    continue
                if "swapped" not in row:  # not judged blind (an older version, or added by hand)
                    continue
                if {row.get("chosen_model"), row.get("rejected_model")} == pair:
                    wins[row["chosen_model"]] += 1
                elif set(row.get("models") or ()) == pair:
                    ties += row.get("verdict") == TIE
                    both_bad += row.get("verdict") == BOTH_BAD
        decisive = sum(wins.values())
        rates = {m: {"rate": wins[m] / decisive if decisive else None, "ci95": wilson_interval(wins[m], decisive)}
                 for m in models}
        return {"models": list(models), "judgments": decisive + ties + both_bad, "wins": wins, "ties": ties,
                "both_bad": both_bad, "decisive": decisive, "win_rate": rates,
                "interval": "Wilson score, 95%, over the decisive judgments"}

    def write_tally(self, models: tuple[str, str]) -> dict:
        with self._lock:
            tally = self.tally(models)
            staged = self.tally_path.with_name(self.tally_path.name + ".tmp")
            staged.write_text(json.dumps(tally, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            staged.replace(self.tally_path)
        return tally


def tally_text(tally: dict) -> str:
    """One line for the UI: the counts, then each model's win rate and its interval."""
    wins = ", ".join(f"`{m}` {n} win{'s' * (n != 1)}" for m, n in tally["wins"].items())
    line = f"**Tally** ({tally['judgments']} judged): {wins}, {tally['ties']} tie{'s' * (tally['ties'] != 1)}, " \
           f"{tally['both_bad']} both bad"
    rates = [f"`{m}` {r['rate']:.0%} (95% CI {r['ci95'][0]:.0%}–{r['ci95'][1]:.0%})"
             for m, r in tally["win_rate"].items() if r["rate"] is not None]
    return line + (f" · win rate over {tally['decisive']} decisive: " + ", ".join(rates) if rates else "")


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
    max_upload_mb: float = 10.0, seed: int | None = None,
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
        gr.Markdown(f"### {title} · compare, blind · judgments → `{log_file.path}`")
        _compare(endpoint, compare, log_file, max_bytes, random.Random(seed))
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


VERDICTS = {"a": "A is better", "b": "B is better", TIE: "Tie", BOTH_BAD: "Both bad"}  # elem_id pick-<key>


def _compare(a: Endpoint, b: Endpoint, log_file: JudgmentLog, max_bytes: int, order: random.Random) -> None:
    """Blind A/B: per question the endpoints are shown in a random order (drawn from `order`) under the names A
    and B; the models are named after the pick."""
    import gradio as gr

    order_lock = threading.Lock()
    with gr.Row():
        with gr.Column(scale=1):
            image_in = _upload_only(gr.Image)(type="filepath", sources=["upload", "clipboard"], label="Image",
                                              elem_id="image", height=260)
            question = gr.Textbox(label="Question", lines=2, elem_id="question")
            ask = gr.Button("Ask both", variant="primary", elem_id="ask")
        with gr.Column(scale=2):
            with gr.Row():
                boxes = [gr.Textbox(label=side, lines=10, interactive=True, elem_id=f"answer-{side.lower()}")
                         for side in "AB"]
            with gr.Row():
                picks = [gr.Button(label, interactive=False, elem_id=f"pick-{key.replace('_', '-')}",
                                   variant="secondary") for key, label in VERDICTS.items()]
    status = gr.Markdown(elem_id="status")
    tally_md = gr.Markdown(elem_id="tally")
    asked = gr.State(None)  # what was asked, the order, and the answers as the models gave them (server side)

    def run(image_value, question_text):
        text, pasted = split_data_urls(question_text)
        if not text:  # a pasted image alone is no question, and train would skip its judgment
            raise gr.Error("type a question")
        try:
            image = load_image(image_value or (pasted[0] if pasted else None), max_bytes)
        except ImageRejected as exc:
            raise gr.Error(str(exc)) from None
        with order_lock:
            swapped = order.random() < 0.5
        sides = (b, a) if swapped else (a, b)  # sides[0] is shown as A
        messages = [user_message(text, [image])]
        answers, errors, updates = ["", ""], [None, None], queue.Queue()

        def worker(i: int, endpoint: Endpoint) -> None:
            try:
                for answer in endpoint.stream(messages):
                    updates.put((i, answer))
            except Exception as exc:  # noqa: BLE001 - shown in that side's box (no judgment: naming it is fine)
                errors[i] = f"[{endpoint.url}: {type(exc).__name__}: {exc}]"
            updates.put((i, None))

        for i, endpoint in enumerate(sides):
            threading.Thread(target=worker, args=(i, endpoint), daemon=True).start()
        locked = [gr.update(interactive=False)] * len(VERDICTS)
        running = 2
        while running:
            i, answer = updates.get()
            if answer is None:
                running -= 1
            else:
                answers[i] = answer
            # label "A"/"B": a new question hides the names that the last pick revealed
            yield (*(gr.update(value=answers[j], label="AB"[j]) for j in range(2)), None, *locked, "answering…",
                   gr.update())
        ok = not any(errors) and all(s.strip() for s in answers)
        shown = [gr.update(value=errors[i] or answers[i], label="AB"[i]) for i in range(2)]
        state = None
        if ok:
            state = {"image": image, "question": text, "answers": answers, "models": [e.model for e in sides],
                     "pair": (a.model, b.model), "swapped": swapped}
        open_ = [gr.update(interactive=ok)] * len(VERDICTS)
        yield (*shown, state, *open_, "pick the better answer (edit it first if you like); the models are named "
               "after the pick" if ok else "", gr.update())

    def pick(verdict: str):
        def save(state, text_a, text_b):
            if state is None:
                raise gr.Error("ask first")
            models, answers = state["models"], state["answers"]
            common = dict(swapped=state["swapped"], created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if verdict in ("a", "b"):
                i = "ab".index(verdict)
                chosen = (text_a, text_b)[i].strip()
                rejected = answers[1 - i].strip()
                if not chosen or chosen == rejected:
                    raise gr.Error("the chosen answer is empty or the same as the other one: pick Tie or Both bad")
                row = log_file.append(
                    state["image"], state["question"], chosen, rejected, chosen_model=models[i],
                    rejected_model=models[1 - i], edited=chosen != answers[i].strip(), chosen_side="AB"[i], **common,
                )
                said = f"{'AB'[i]} (`{models[i]}`) chosen over `{models[1 - i]}` → `{log_file.path}`"
            else:
                row = log_file.append_unpaired(verdict, state["image"], state["question"], answers, models, **common)
                said = (f"{VERDICTS[verdict].lower()}: A was `{models[0]}`, B was `{models[1]}` (not a training "
                        f"pair) → `{log_file.unpaired_path}`")
            tally = log_file.write_tally(state["pair"])
            revealed = [gr.update(label=f"{'AB'[j]} · {models[j]}") for j in range(2)]
            locked = [gr.update(interactive=False)] * len(VERDICTS)
            return None, *revealed, *locked, f"saved judgment `{row['idx'][:8]}`: {said}", tally_text(tally)

        return save

    outputs = [*boxes, asked, *picks, status, tally_md]
    ask.click(run, [image_in, question], outputs)
    question.submit(run, [image_in, question], outputs)
    for key, button in zip(VERDICTS, picks):
        button.click(pick(key), [asked, *boxes], [asked, *boxes, *picks, status, tally_md])


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
    app = build_app(a, b, args.judgments, args.max_upload_mb, args.seed)
    app.queue().launch(**launch_kwargs(args))
