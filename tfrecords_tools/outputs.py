"""Output stage: how every command writes a file or a folder without harming the user's data.

Three guarantees, used by every writer in both packages (this module imports no TensorFlow):

- `check_not_input(out, inputs)`: an output that is one of the inputs (the same path, a symbolic
  link to it or a hard link to it) is refused before any work, with `OutputIsInputError`.
- `atomic_file(path)`: a file is written under a temporary name in its own folder and renamed over
  `path` only when complete; a failed or killed run leaves no file at `path` (a SIGKILL leaves a
  hidden `.NAME.stp-tmp-PID.EXT` beside it, never a half-written `path`).
- `writing(folder)` / `reading(folder)`: an exclusive / shared `fcntl.flock` on `folder/.stp-lock`.
  One writer at a time and no reader beside it; a second writer or a reader of a folder being
  written is refused at once with `OutputBusyError`, naming the other process. The kernel releases
  the lock when its process dies, so a SIGKILLed run never blocks the next one. The writer puts
  its PID and command line into the lock file. Remote folders (gs://, s3://) are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from typing import Iterable, Iterator, List, Optional, Tuple

from tfrecords_tools.errors import BadInput, NotNow

LOCK_NAME = ".stp-lock"


class OutputError(BadInput, RuntimeError):
    """An output path that may not be written now (the base of the two refusals below)."""


class OutputIsInputError(OutputError):
    """The output would overwrite one of the command's inputs."""

    def __init__(self, output: str, input_path: str, how: str):
        self.output, self.input, self.how = output, input_path, how
        super().__init__(f"{output}: expected an output that is not one of the inputs; received {how} the input "
                         f"{input_path} (writing it would destroy the input). Choose another output path.")


class OutputBusyError(NotNow, OutputError):
    """Another process holds the folder: a writer (for anyone), or readers (for a writer)."""

    def __init__(self, folder: str, wanted: str, holders: List[Tuple[int, str, str]]):
        self.folder, self.wanted, self.holders = folder, wanted, holders
        writers = [h for h in holders if h[1] == "write"]
        shown = writers or holders
        who = "; ".join(f"PID {pid}" + (f" ({command})" if command else "") for pid, _, command in shown)
        doing = "written" if writers or not holders else "read"
        expected = "no process reading or writing it" if wanted == "write" else "no process writing it"
        super().__init__(f"{folder}: being {doing} by {who or 'another process'}. Expected {expected} (to "
                         f"{wanted} it); received a lock held in {os.path.join(folder, LOCK_NAME)}. "
                         f"Wait for that process to end, or use another folder.")

    @property
    def pids(self) -> List[int]:
        return [pid for pid, _, _ in self.holders]


# --- outputs that are inputs ------------------------------------------------------------------


def check_not_input(output: str, inputs: Iterable[Optional[str]]) -> None:
    """Raises `OutputIsInputError` when `output` is one of `inputs` (same path, symbolic or hard link).

    Local paths only; `None` and remote (`scheme://`) entries are skipped.
    """
    if not output or "://" in output:
        return
    for path in inputs:
        if not path or "://" in path:
            continue
        how = _sameness(output, path)
        if how:
            raise OutputIsInputError(output, path, how)


def _sameness(output: str, path: str) -> str:
    if os.path.realpath(output) == os.path.realpath(path):
        return "a symbolic link to" if os.path.islink(output) or os.path.islink(path) else "the same path as"
    try:
        if os.path.samefile(output, path):  # same device and inode: a hard link
            return "a hard link to"
    except OSError:  # the output does not exist yet
        pass
    return ""


# --- files written whole or not at all --------------------------------------------------------


def temporary_name(path: str) -> str:
    """A hidden name beside `path` that keeps its extension (PyAV and Pillow pick the format by it)."""
    folder, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.stp-tmp-{os.getpid()}{ext}")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path to write; renames it to `path` when the block ends without error.

    On any exception (also KeyboardInterrupt) the temporary file is removed and `path` is left as it
    was: an earlier file there stays whole, and no new one appears.
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> str:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


# --- one writer, or readers, per folder -------------------------------------------------------


@contextlib.contextmanager
def writing(folder: str, *, wait: bool = False, command: Optional[str] = None) -> Iterator[None]:
    """Holds `folder` (created if needed) exclusively: no other writer and no reader while the block runs.

    Refuses at once with `OutputBusyError` when another process holds it, or with `wait` blocks until
    it is free (for short critical sections, e.g. claiming an export version).
    """
    if "://" in folder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, folder, fcntl.LOCK_EX, wait)
        info = {"pid": os.getpid(), "command": command or _command(os.getpid()),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # before the lock goes: the next holder writes its own
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reading(folder: str) -> Iterator[None]:
    """Holds `folder` shared while the block runs: readers together, no writer beside them.

    Refuses at once with `OutputBusyError` when a writer holds it. A folder that cannot take a lock
    file (read-only, never written by this version) and has none is read unlocked.
    """
    if "://" in folder or not os.path.isdir(folder):
        yield
        return
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        _lock(fd, folder, fcntl.LOCK_SH, wait=False)
        yield
    finally:
        os.close(fd)


def _lock(fd: int, folder: str, kind: int, wait: bool) -> None:
    try:
        fcntl.flock(fd, kind | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise OutputBusyError(folder, "write" if kind == fcntl.LOCK_EX else "read", holders(fd)) from None


def holders(fd: int) -> List[Tuple[int, str, str]]:
    """(pid, 'write' | 'read', command line) of the processes holding the flock of the open lock file `fd`.

    From /proc/locks (Linux); elsewhere, the writer the lock file names.
    """
    inode = os.fstat(fd).st_ino
    found = []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "1: -> FLOCK ..." is a waiter, not a holder.
        if len(parts) < 6 or parts[1] != "FLOCK" or not parts[5].endswith(f":{inode}"):
            continue
        pid = int(parts[4]) if parts[4].isdigit() else 0
        found.append((pid, "write" if parts[3] == "WRITE" else "read", _command(pid)))
    if found:
        return found
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    return [(int(info["pid"]), "write", str(info.get("command", "")))] if info.get("pid") else []


def _command(pid: int) -> str:
    if pid == os.getpid():
        args = sys.argv
    else:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return ""
    return " ".join(args).replace("\n", " ")  # the refusal stays one line
