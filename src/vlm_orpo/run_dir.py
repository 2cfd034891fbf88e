"""A run's output directory: checked writable before anything loads, locked for the run's life, and read back.

One run writes one directory. The lock is an advisory `flock` on `.lock`, taken by the main process: the kernel
drops it when that process exits or is killed, so a stale lock never needs cleaning up.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from vlm_orpo.errors import ConfigError, first_line
from vlm_orpo.reporting import read_jsonl

BEST, FINAL, METRICS, SUMMARY, LOCK = "best", "final", "metrics.jsonl", "summary.md", ".lock"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_file = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        """Make the directory, or one line saying why it cannot be written (a file in the way, no permission)."""
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"output_dir {self.path}: {parent} is a file, not a directory")
                break
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"output_dir {self.path} is not writable: {first_line(exc, with_type=False)}") from None

    def lock(self) -> None:
        """Hold `.lock` until this process ends; a second run into the same directory is refused in one line."""
        self.create()
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path} is in use by another run ({holder}); wait for it, or set another "
                              "training.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    def checkpoints(self) -> list[Path]:
        """checkpoint-N folders, oldest first (an empty list when the directory does not exist)."""
        return [Path(p) for p in sort_checkpoints(str(self.path))] if self.path.is_dir() else []

    def last_checkpoint(self) -> Path | None:
        found = get_last_checkpoint(str(self.path)) if self.path.is_dir() else None
        return Path(found) if found else None

    def finished_step(self) -> int | None:
        """The step at which a finished run wrote final/ (renamed into place whole), or None."""
        record = self.path / FINAL / "run.json"
        return json.loads(record.read_text())["step"] if record.is_file() else None

    @staticmethod
    def completed(checkpoint: Path) -> bool:
        """Whether the checkpoint was saved at the run's last step (its trainer state says so)."""
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
        return state["global_step"] >= state["max_steps"] > 0

    def last_eval_step(self) -> int | None:
        path = self.path / METRICS
        steps = [r["step"] for r in read_jsonl(path) if "eval_loss" in r] if path.exists() else []
        return steps[-1] if steps else None

    def truncate_metrics(self, last_step: int) -> None:
        """On resume, drop records the killed run wrote after its last checkpoint (they are recomputed)."""
        path = self.path / METRICS
        if path.exists():
            kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
