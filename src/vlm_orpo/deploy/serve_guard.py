"""The ASGI middleware `vlm-orpo serve` gives vLLM (`--middleware`): what vLLM 0.32 leaves open, closed.

- vLLM's `--api-key` guards `/v1/*` only: `/invocations` answers chats without it, `/tokenize`, `/metrics`,
  `/pause` ... are open. Here the key guards every route but `/health`.
- vLLM fetches any http(s) media URL in a request, loopback and private addresses too. Here a request is
  refused when a `*url` field is neither a data URL nor on an allowed domain.
- vLLM reads a request body whole, however large. Here a body over the cap is refused with 413 as soon as
  its Content-Length, or the bytes received so far, say so.

It runs inside vLLM's environment, which lacks vlm_orpo: the standard library only. vLLM builds it without
arguments, so its settings come from the environment that serve.build_command writes.
"""

from __future__ import annotations

import hmac
import json
import os
from urllib.parse import urlsplit

KEY_ENV = "VLLM_API_KEY"
MAX_BYTES_ENV = "VLM_ORPO_MAX_REQUEST_BYTES"
DOMAINS_ENV = "VLM_ORPO_MEDIA_DOMAINS"  # comma-separated
OPEN_PATHS = ("/health",)  # for load balancers and service managers: says nothing, serves nothing


class ServeGuard:
    def __init__(self, app):
        self.app = app
        key = os.environ.get(KEY_ENV)
        self.key = key.encode() if key else None
        self.max_bytes = int(os.environ[MAX_BYTES_ENV])
        self.domains = {d for d in os.environ.get(DOMAINS_ENV, "").split(",") if d}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self.key and path not in OPEN_PATHS and not self.authorized(scope["headers"]):
            return await refuse(scope, send, 401, "this server needs its API key: `Authorization: Bearer KEY`")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:  # refused unread
            return await refuse(scope, send, 413, f"request body over {self.max_bytes} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await refuse(scope, send, 413, f"request body over {self.max_bytes} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        reason = media_refusal(body, self.domains)
        if reason:
            return await refuse(scope, send, 400, reason)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the app waits here for the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def authorized(self, headers) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


def media_refusal(body: bytes, domains: set[str]) -> str | None:
    """Why a JSON body is refused: a `*url` string (image_url, video_url, audio_url, url, server_url ...) that is
    neither a data URL nor an http(s) URL on one of `domains`. None when there is none, or the body is not JSON
    (the app answers that: it parses with the same json module)."""
    try:
        stack = [json.loads(body)]
    except ValueError:
        return None
    except RecursionError:
        return "JSON nested too deeply"
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, value in pairs:
            if isinstance(value, (dict, list)):
                stack.append(value)
            elif isinstance(key, str) and key.lower().endswith("url") and isinstance(value, str):
                if not allowed_url(value, domains):
                    fetched = f"only from {', '.join(sorted(domains))}" if domains else "not at all"
                    return f"media must be base64 data URLs; URLs are fetched {fetched}: {value[:100]}"
    return None


def allowed_url(url: str, domains: set[str]) -> bool:
    if url[:5].lower() == "data:":  # as vLLM tells data URLs apart
        return True
    try:
        parts = urlsplit(url.strip())
        return parts.scheme.lower() in ("http", "https") and parts.hostname in domains
    except ValueError:  # e.g. an unclosed [IPv6
        return False


async def refuse(scope, send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})  # before accept: uvicorn answers 403
    body = json.dumps({"error": {"message": message, "type": "Refused", "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
