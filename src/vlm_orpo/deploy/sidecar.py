"""What `serve`, `quantize` and `chat` share: the interpreter of a side environment, and the address to bind.

vLLM and llm-compressor pin library versions that clash with training's and with each other, so each lives in
its own venv (`.venv-serve`, `.venv-quantize`) and runs as a child process.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from vlm_orpo.config import ConfigError

CHECKOUT = Path(__file__).resolve().parents[3]  # an editable install's source checkout


def env_python(venv: str, explicit: str | None, setup_hint: str, roots: list[Path] | None = None) -> str:
    """`explicit` if given, else `<root>/<venv>/bin/python` under the current folder or this source checkout."""
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"interpreter not found: {explicit}; {setup_hint}")
        return explicit
    for root in roots if roots is not None else [Path.cwd(), CHECKOUT]:
        candidate = root / venv / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"no {venv} here or in {CHECKOUT}; {setup_hint}")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_port_free(host: str, port: int) -> None:
    """One clear line now, rather than a server's traceback after minutes of loading, when the port is taken."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use; pick another with --port") from None
            raise ConfigError(f"cannot bind {host}:{port}: {exc.strerror}") from None
