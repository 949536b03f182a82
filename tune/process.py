"""Running `python -m tune.worker`: the environment, the protocol, cancelling, time limits.

The worker runs in a process group of its own with idle OpenMP threads that sleep
(`core.threads.quiet_openmp`), an explicit thread count, a lower priority, and nothing
allowed to download. Its JSON lines arrive through a reader thread, so the caller's loop
can notice a cancel request or a deadline at any moment; on either, or on any error in
the caller (a progress callback that raises, Ctrl-C), the whole group is terminated and
then killed. Blocking: call it from a worker thread (`asyncio.to_thread`) in async code.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from core.threads import quiet_openmp, usable_cores
from tune.errors import (
    BaseNotLoadable,
    DatasetError,
    NotEnoughDisk,
    TrainingCancelled,
    TrainingFailed,
    TuneError,
)

# Below the bot (0) and its llama.cpp servers: training takes only what they leave.
DEFAULT_NICE = 10
_STOP_GRACE_S = 3.0
_POLL_S = 0.2
_ERRORS: dict[str, type[TuneError]] = {
    "base": BaseNotLoadable,
    "disk": NotEnoughDisk,
    "dataset": DatasetError,
    "failed": TrainingFailed,
}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# The folder holding the `tune`, `chains` and `core` packages this process runs.
_CODE_ROOT = Path(__file__).resolve().parent.parent


def default_training_threads() -> int:
    """Every usable core: the worker runs at a lower priority, so the bot still comes first."""
    return usable_cores()


def worker_environment(threads: int) -> dict[str, str]:
    """The worker's environment: this one's, quiet OpenMP, `threads` everywhere, offline, our code first."""
    env = dict(os.environ)
    quiet_openmp(env)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's own threads would ignore the count
    env.update(_OFFLINE)  # the tokenizer and config come from the GGUF: nothing to download
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_CODE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


class _Worker:
    """One worker process, its stdout lines in a queue, its stderr in an unlinked temporary file."""

    def __init__(self, args: list[str], threads: int, nice: int) -> None:
        fd, log_path = tempfile.mkstemp(prefix="switchboard-tune-", suffix=".log")
        os.close(fd)
        try:
            writer = open(log_path, "ab")
            self.log: IO[bytes] = open(log_path, "rb")
        finally:
            os.unlink(log_path)
        command = [
            sys.executable,
            "-m",
            "tune.worker",
            "--parent-pid",
            str(os.getpid()),
            "--nice",
            str(nice),
            "--threads",
            str(threads),
            *args,
        ]
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=writer,
                env=worker_environment(threads),
                close_fds=True,
                start_new_session=True,  # its own group: cancelling kills every child it made
            )
        except BaseException:
            self.log.close()
            raise
        finally:
            writer.close()
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, name="tune-worker-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL it; reap the process; close our files."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=_STOP_GRACE_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the worker itself started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.log):
            with contextlib.suppress(OSError, ValueError):
                if stream:
                    stream.close()

    def last_error(self) -> str:
        """The last line of the worker's stderr that looks like an error (a traceback's last line)."""
        with contextlib.suppress(OSError, ValueError):
            self.log.seek(max(0, os.fstat(self.log.fileno()).st_size - 64 * 1024))
            lines = [
                line.strip()
                for line in self.log.read().decode("utf-8", "replace").splitlines()
                if line.strip()
            ]
            for line in reversed(lines):
                if "Error" in line or "error" in line or "Killed" in line:
                    return line[-300:]
            if lines:
                return lines[-1][-300:]
        return ""


def run_worker(
    args: list[str],
    *,
    what: str,
    threads: int,
    nice: int = DEFAULT_NICE,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: threading.Event | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run one worker step to its end; its `done` line, or the TuneError its `error` line names.

    `what` names the step in messages ("Training", "Preparing the base"). `cancel` set from
    any thread stops it (TrainingCancelled); past `timeout_s` it is stopped (TrainingFailed).
    """
    worker = _Worker(args, threads, nice)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"{what} was cancelled; nothing was kept.")
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingFailed(
                    f"{what} ran past its time limit ({timeout_s:.0f} s) and was stopped; "
                    "nothing was kept. Give it fewer steps or a larger time budget."
                )
            try:
                line = worker.lines.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the worker exited without a last word
                worker.proc.wait()
                detail = worker.last_error() or f"exit status {worker.proc.returncode}"
                if worker.proc.returncode == -signal.SIGKILL:
                    detail = f"killed by SIGKILL, perhaps out of memory; {detail}"
                raise TrainingFailed(f"{what} stopped unexpectedly ({detail}).")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (a library that wrote to the real stdout)
            event = message.pop("event", None)
            if event == "progress" and on_progress is not None:
                on_progress(message)
            elif event == "done":
                return dict(message)
            elif event == "error":
                error = _ERRORS.get(str(message.get("kind")), TrainingFailed)
                raise error(str(message.get("message") or f"{what} failed."))
    finally:
        worker.stop()
