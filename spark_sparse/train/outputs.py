"""The files SparK users know, in ``output_<name>/``: logs, console backups, checkpoints, a PNG.

Only the main process writes. Checkpoints go through :func:`spark_sparse.checkpoint.atomic_save`.
A folder that already holds a run is never overwritten silently: :meth:`RunOutputs.check_reusable`
refuses unless the new run continues it (from its own ``*_still_pretraining.pth``) or
``--overwrite`` asks to start over; the log is only ever appended to, except by ``--overwrite``.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Collection, NamedTuple, Optional, TextIO

from ..errors import ConfigError

__all__ = ["LoggedRun", "RunOutputs", "git_commit", "git_state", "resume_command", "Tee", "without_flags"]


class LoggedRun(NamedTuple):
    """A run as its ``pretrain_log.txt`` tells it: the last epoch line's epoch; from the last header (a resumed
    run may have raised ``--ep``) the run's ``--ep``, its command and its model arguments as JSON reads them
    (tuples as lists). ``None`` / ``""`` / ``{}`` where not logged."""

    epoch: Optional[int] = None
    total: Optional[int] = None
    command: str = ""
    model_kwargs: dict = {}


#: what follows ``<model>`` in a run's two checkpoint names (resumable state, timm-style encoder)
STILL_PRETRAINING, PRETRAINED = "_still_pretraining.pth", "_1kpretrained.pth"


_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str, repo: Path) -> Optional[str]:
    """``git args`` run in ``repo``: its output, or None where git or the repository is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=repo)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(repo: Path = _PACKAGE_DIR) -> Optional[str]:
    """The commit of the code that runs (SparK's log records it too); None outside a git checkout."""
    return (_git("rev-parse", "HEAD", repo=repo) or "").strip() or None


def git_state(repo: Path = _PACKAGE_DIR) -> dict:
    """``git_commit``, ``git_dirty`` (tracked files differ from it: then the commit alone does not say what ran;
    untracked files did not run) and the first 50 ``git_changed_files``; None values outside a checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no", repo=repo)
    changed = None if status is None else [line[3:] for line in status.splitlines()]
    return {"git_commit": git_commit(repo), "git_dirty": None if changed is None else bool(changed),
            "git_changed_files": (changed or [])[:50]}


def without_flags(words: list[str], valued: Collection[str], bare: Collection[str] = ()) -> list[str]:
    """Command-line ``words`` without the named options, in SparK's spelling or dashed: ``valued`` ones as
    ``--name=value`` or ``--name value``, ``bare`` ones (flags) alone."""
    kept, skip_value = [], False
    for word in words:
        if skip_value:
            skip_value = False
            continue
        name = word[2:].split("=", 1)[0].replace("-", "_") if word.startswith("--") else None
        if name in valued:
            skip_value = "=" not in word
        elif name not in bare:
            kept.append(word)
    return kept


def _without_restart_flags(command: str) -> list[str]:
    """A run's command without the options that say how it starts (resume, overwrite): what the folder guard
    builds its suggested commands from."""
    return without_flags(shlex.split(command), valued=("resume_from", "resume"), bare=("overwrite",))


def resume_command(cmd: str, checkpoint: Path | str) -> str:
    """What continues a stopped run: its own command (torchrun's launch flags included) with ``--resume_from``;
    the flag alone where no command is known (a library call)."""
    return shlex.join([*(_without_restart_flags(cmd) if cmd else []), f"--resume_from={checkpoint}"])


class Tee:
    """A text stream that writes to the console and to ``file``: a backup (SparK's stdout/stderr_backup), or a
    buffer for what is printed before the output folder may be written to (the kernel tuning)."""

    def __init__(self, stream: TextIO, file: TextIO):
        self.stream, self.file = stream, file

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


def epochs_text(count: int) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} epoch{'' if count == 1 else 's'}"


class RunOutputs:
    """Paths and writers of one run's output folder."""

    #: files of a run that are not checkpoints (those are ``*_still_pretraining.pth``, ``*_1kpretrained.pth``)
    PLAIN_FILES = ("pretrain_log.txt", "stdout_backup.txt", "stderr_backup.txt", "reconstruction.png")

    #: held (``flock``) by the process writing the folder, while it runs: a second run into the folder (a restarted
    #: job whose first still runs, orphaned ranks of a killed launcher) is refused instead of writing alongside it
    LOCK_FILE = ".spark-pretrain.lock"

    def __init__(self, exp_dir: Path, model: str, is_main: bool):
        self.dir = Path(exp_dir)
        self.model, self.is_main = model, is_main
        self._tees: list[tuple[str, Tee]] = []
        self._lock: Optional[TextIO] = None

    def check_not_in_use(self) -> None:
        """Refuse a folder another live process is writing (its lock is held; a dead one's is released)."""
        holder = self._lock_holder()
        if holder is not None:
            raise self._in_use(holder)

    def _in_use(self, holder: str) -> ConfigError:
        return ConfigError(f"{self.dir}/ is being written by another run right now ({holder}): wait for it to end or "
                           f"stop it before starting or resuming a run here, or choose another --exp_dir")

    def held_lock(self) -> Optional[tuple[int, int, int]]:
        """The held lock's descriptor, device and inode, for forked children to close (``None``: none held)."""
        if self._lock is None:
            return None
        held = os.fstat(self._lock.fileno())
        return self._lock.fileno(), held.st_dev, held.st_ino

    def _lock_holder(self) -> Optional[str]:
        path = self.dir / self.LOCK_FILE
        try:
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return fh.read().strip() or "a process that did not say which"
                fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError:             # no lock file, or a file system without locks: nothing to go by
            return None
        return None

    def _take_lock(self) -> None:
        try:
            lock = open(self.dir / self.LOCK_FILE, "a+")
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:              # taken since the run was checked
            lock.close()
            raise self._in_use(self._lock_holder() or "a process that has just ended") from None
        except OSError:                      # a file system without locks: run unguarded, as before
            lock.close()
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        self._lock = lock

    @property
    def log_path(self) -> Path:
        return self.dir / "pretrain_log.txt"

    @property
    def still_pretraining_path(self) -> Path:
        return self.dir / f"{self.model}{STILL_PRETRAINING}"

    @property
    def pretrained_path(self) -> Path:
        return self.dir / f"{self.model}{PRETRAINED}"

    @property
    def reconstruction_path(self) -> Path:
        return self.dir / "reconstruction.png"

    def existing_run_files(self) -> list[Path]:
        """The files a previous run left in this folder (checkpoints of any model count)."""
        if not self.dir.is_dir():
            return []
        plain = [self.dir / name for name in self.PLAIN_FILES if (self.dir / name).exists()]
        checkpoints = sorted(p for pattern in (f"*{STILL_PRETRAINING}", f"*{PRETRAINED}")
                             for p in self.dir.glob(pattern))
        return plain + checkpoints

    def logged_run(self) -> LoggedRun:
        """What the log says of its run (:class:`LoggedRun`): what a refusal reports, and the command it offers
        to continue a run the new command does not build the same way."""
        logged = LoggedRun()
        if not self.log_path.is_file():
            return logged
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if isinstance(record.get("args"), dict):
                args = record["args"]
                logged = logged._replace(total=args.get("ep"), command=str(record.get("cmd") or ""),
                                         model_kwargs=args.get("model_kwargs") or {})
            elif "epoch" in record:
                logged = logged._replace(epoch=record["epoch"])
        return logged

    def continues_this_folder(self, resume_from: Optional[str]) -> bool:
        """True when ``resume_from`` is this folder's own ``<model>_still_pretraining.pth``."""
        return resume_from is not None and Path(resume_from).resolve() == self.still_pretraining_path.resolve()

    def check_reusable(self, resume_from: Optional[str], overwrite: bool, cmd: str, epochs: int,
                       resume_auto: bool = False, model_kwargs: Optional[dict] = None) -> None:
        """Refuse to write into a folder holding another run unless continuing it or told to start over.

        Continuing means resuming from this folder's own checkpoint: the log is appended to. A
        resume from a checkpoint elsewhere would replace this folder's checkpoints, so here it
        counts as starting over and needs ``--overwrite`` too. With ``--resume_from=auto`` a folder
        whose run died before its first checkpoint (logs only) is started again, the log appended to:
        the same command serves a job's first start and every restart. Raises :class:`ConfigError`
        naming the files found, the last logged epoch and the commands that fit what was found: a run of
        another model, or of this one built with other ``model_kwargs``, is offered its own logged command.
        """
        existing = self.existing_run_files()
        if not existing or overwrite or self.continues_this_folder(resume_from):
            return
        models = {path.name.removesuffix(suffix) for path in existing
                  for suffix in (STILL_PRETRAINING, PRETRAINED) if path.name.endswith(suffix)}
        if resume_auto and resume_from is None and not models:     # logs only: died before its first checkpoint
            return
        logged = self.logged_run()
        epoch, total = logged.epoch, logged.total
        progress = "" if epoch is None else f"; last logged epoch {epoch}" + ("" if total is None else f" of {total}")
        words = _without_restart_flags(cmd)
        unknown = "spark-pretrain <same arguments>"                 # a library call passes no command
        base = shlex.join(words) or unknown
        others = sorted(models - {self.model})
        own_words = _without_restart_flags(logged.command)        # the logged run's command, [] if none logged
        own = shlex.join(own_words)
        built_otherwise = (model_kwargs is not None and own
                           and json.loads(json.dumps(model_kwargs, default=str)) != logged.model_kwargs)

        def continued(command_words: list[str], resume_from: str, why: str, done: bool) -> str:
            """The command that continues the run; a finished run's own --ep gives way to a larger one."""
            if not done:
                return f"continue it:  {shlex.join(command_words) or unknown} --resume_from={resume_from}{why}"
            longer = shlex.join(without_flags(command_words, valued=("ep",))) or unknown
            finished = f"it finished its {epochs_text(epoch)}"
            why = f"{why[:-1]}; {finished})" if why else f"   ({finished})"
            return f"continue it:  {longer} --resume_from={resume_from} --ep <more than {epoch}>{why}"

        logged_done = epoch is not None and total is not None and epoch >= total
        if self.still_pretraining_path.exists() and built_otherwise:
            resume = continued(own_words, str(self.still_pretraining_path), "   (its own command, from its log: it "
                               "was built with other --model_kwargs)", logged_done)
        elif self.still_pretraining_path.exists():
            resume = continued(words, str(self.still_pretraining_path), "", epoch is not None and epoch >= epochs)
        elif others and own:
            resume = continued(own_words, "auto", f"   (its own command, from its log: it is a run of "
                                                  f"{', '.join(others)}, not of {self.model})", logged_done)
        elif others:
            resume = (f"continue it:  it is a run of {', '.join(others)}, not of {self.model}: add --model "
                      f"{others[0]} --resume_from=auto")
        elif self.pretrained_path.exists():                       # its checkpoint was deleted (the large file)
            export = self.pretrained_path
            state = f"it finished its {epochs_text(epoch)}" if logged_done else "it cannot be resumed"
            resume = (f"continue it:  its {self.still_pretraining_path.name} is gone ({state}; its encoder, "
                      f"{export.name}, is left): to train that encoder further, start a run from it in another "
                      f"folder: {base} --exp_dir <another folder> --init_weight={export}")
        else:
            resume = (f"continue it:  it has no {self.still_pretraining_path.name} (it stopped before its first "
                      f"epoch ended); start it again, keeping its log: {base} --resume_from=auto")
        raise ConfigError(f"{self.dir}/ already holds a run ({', '.join(p.name for p in existing)}{progress}); "
                          f"nothing was written. To\n"
                          f"  {resume}\n"
                          f"  start over:   {base} --overwrite   (deletes those files first)\n"
                          f"  or choose another experiment name or --exp_dir.")

    def check_writable(self) -> None:
        """Fail before the run is built, not at its first write, where the folder cannot be made or written."""
        existing = self.dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"cannot create the output folder {self.dir}/: {existing} is a file; choose another "
                              f"--exp_dir or experiment name")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write the output folder {self.dir}/: no write permission in {existing}; choose "
                              f"another --exp_dir or fix its permissions")
        # what permissions do not tell (a read-only mount, /proc, root squash): make the missing folders and take
        # them away again, so that nothing is left and the error comes before the run is built
        missing = [self.dir, *self.dir.parents][:len(self.dir.relative_to(existing).parts)]
        self._make_folder()
        for folder in missing:
            folder.rmdir()

    def _make_folder(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the output folder {self.dir}/ ({err.strerror}); choose another "
                              f"--exp_dir") from None

    def open(self, fresh: bool, capture_console: bool = False, printed_before: Optional[dict[str, str]] = None
             ) -> "RunOutputs":
        """Create the folder; with ``fresh`` (``--overwrite``) delete a previous run's files first.

        ``capture_console`` tees this process's ``sys.stdout``/``sys.stderr`` into the console
        backups (SparK's ``stdout_backup.txt``, ``stderr_backup.txt``), which begin with
        ``printed_before`` (stream name -> text printed while the run was built). Only the CLI asks for it:
        a library call of :func:`~spark_sparse.train.engine.pretrain` leaves the caller's streams alone.
        """
        if self.is_main:
            self._make_folder()      # checked before the run was built; a disk may have filled since
            self._take_lock()
            deleted = sorted(self.existing_run_files()) if fresh else []
            for path in deleted:
                path.unlink()
            if capture_console:
                for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                    tee = Tee(stream, open(self.dir / f"{name}_backup.txt", "a", buffering=1))
                    tee.file.write((printed_before or {}).get(name, ""))
                    setattr(sys, name, tee)
                    self._tees.append((name, tee))
            if deleted:
                print(f"[spark-pretrain] --overwrite: deleted the previous run's {', '.join(p.name for p in deleted)} "
                      f"in {self.dir}/", file=sys.stderr)
        return self

    def record_in_backup(self, name: str, text: str) -> None:
        """Append ``text`` to console backup ``name`` (``stdout``/``stderr``) only: a line its caller prints
        after :meth:`close` (no backups open: nothing)."""
        for stream_name, tee in self._tees:
            if stream_name == name:
                tee.file.write(text)

    def close(self) -> None:
        for name, tee in reversed(self._tees):
            tee.flush()
            setattr(sys, name, tee.stream)
            tee.close()
        self._tees.clear()
        if self._lock is not None:
            self._lock.close()               # releases the flock; the file stays (removing it would race a taker)
            self._lock = None

    def write_header(self, header: dict) -> None:
        """Append the run's JSON header line: a resumed run adds a header, the log is never truncated."""
        if self.is_main:
            with open(self.log_path, "a") as fh:
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
