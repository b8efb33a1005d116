"""The files SparK users know, in ``output_<name>/``: logs, console backups, checkpoints, a PNG.

Only the main process writes. Checkpoints go through :func:`spark_sparse.checkpoint.atomic_save`.
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO


__all__ = ["RunOutputs", "git_commit", "Tee"]


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Tee:
    """A text stream that writes to the console and to a backup file (SparK's stdout/stderr_backup)."""

    def __init__(self, stream: TextIO, path: Path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def close(self) -> None:
        self.file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class RunOutputs:
    """Paths and writers of one run's output folder."""

    def __init__(self, exp_dir: Path, model: str, is_main: bool):
        self.dir = Path(exp_dir)
        self.model, self.is_main = model, is_main
        self._tees: list[tuple[str, Tee]] = []

    @property
    def log_path(self) -> Path:
        return self.dir / "pretrain_log.txt"

    @property
    def still_pretraining_path(self) -> Path:
        return self.dir / f"{self.model}_still_pretraining.pth"

    @property
    def pretrained_path(self) -> Path:
        return self.dir / f"{self.model}_1kpretrained.pth"

    @property
    def reconstruction_path(self) -> Path:
        return self.dir / "reconstruction.png"

    def open(self) -> "RunOutputs":
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                tee = Tee(stream, self.dir / f"{name}_backup.txt")
                setattr(sys, name, tee)
                self._tees.append((name, tee))
        return self

    def close(self) -> None:
        for name, tee in reversed(self._tees):
            tee.flush()
            setattr(sys, name, tee.stream)
            tee.close()
        self._tees.clear()

    def write_header(self, header: dict, resumed: bool) -> None:
        """The JSON header line (a resumed run appends a new header instead of truncating)."""
        if not self.is_main:
            return
        with open(self.log_path, "a" if resumed else "w") as fh:
            fh.write(json.dumps(header, default=str) + "\n")

    def log_epoch(self, record: dict) -> None:
        if self.is_main:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")

    @staticmethod
    def eta(seconds_per_epoch: float, epochs_left: int) -> tuple[str, str]:
        remaining = seconds_per_epoch * epochs_left
        finish = time.strftime("%m-%d %H:%M", time.localtime(time.time() + remaining))
        return str(datetime.timedelta(seconds=round(remaining))), finish
