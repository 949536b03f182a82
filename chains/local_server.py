"""The child process that runs one llama.cpp server: `python -m chains.local_server --model FILE ...`.

`chains.local.LocalServers` starts one of these per loaded model, so that a crash in
llama.cpp cannot take the bot down and a stuck model can be killed. The child:

- asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and also exits as
  soon as its stdin reaches end-of-file, which happens when the parent exits or crashes
  in any way, so no llama.cpp server outlives Switchboard;
- applies the GGUF LoRA adapter given with `--lora` (a local fine-tune) to every request;
- binds 127.0.0.1 only, on the port it is given (0: a free one the kernel picks);
- prints exactly one JSON line on stdout once the model is loaded and the HTTP server
  listens (`{"ok": true, "address": "http://127.0.0.1:PORT"}`), or `{"ok": false, ...}`
  and exits with status 3; llama.cpp's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
from typing import Any

from core.threads import quiet_openmp

PR_SET_PDEATHSIG = 1
LOOPBACK = "127.0.0.1"


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the parent goes away (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the stdin watchdog below still covers it
    # The parent may have died before prctl took effect: then we were re-parented already.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)


def _watch_stdin() -> None:
    """Exit the whole process (llama.cpp threads included) once the parent's pipe closes."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _params(args: argparse.Namespace) -> Any:
    """llama.cpp server parameters for one model on loopback."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    if args.lora:
        # Applied to every request at full scale: a fine-tune gets a server of its own, so
        # no request ever has to switch adapters (which would need cache_prompt off).
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(args.lora, 1.0)]
    params.hostnames = [LOOPBACK]
    params.port = args.port
    params.n_ctx = args.ctx * args.parallel  # llama.cpp splits n_ctx across the slots
    params.n_parallel = args.parallel
    if args.threads:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    # The GGUF's own chat template, rendered with Jinja as llama.cpp's server does by default.
    params.use_jinja = True
    params.endpoint_slots = (
        True  # the parent asks /slots whether a server is busy before evicting it
    )
    params.ui = False
    params.verbosity = args.verbosity
    # Small models loop without it; requests can still override.
    params.sampling.penalty_repeat = args.repeat_penalty
    if args.temperature is not None:
        params.sampling.temp = args.temperature
    if args.top_p is not None:
        params.sampling.top_p = args.top_p
    return params


def main(argv: list[str] | None = None) -> int:
    """Load the model, serve it on loopback, and live exactly as long as the parent."""
    parser = argparse.ArgumentParser(prog="python -m chains.local_server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", default=None, help="a GGUF LoRA adapter for the model")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=4096, help="context tokens per slot")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--verbosity", type=int, default=1, help="1: errors only")
    parser.add_argument("--repeat-penalty", type=float, default=1.1)
    parser.add_argument(
        "--temperature", type=float, default=None, help="default when a request sets none"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="default when a request sets none"
    )
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)

    _die_with_parent(args.parent_pid)
    # Ctrl-C in a terminal belongs to the parent, which stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_stdin, name="parent-watchdog", daemon=True).start()

    # llama.cpp's CPU build uses OpenMP (libgomp), whose idle threads spin before they
    # sleep and stall whatever else shares the cores (see core.threads). The parent starts
    # us with the quiet policy and OMP_NUM_THREADS = --threads already; this covers a
    # server started by hand. libgomp reads them when it loads: before the import below.
    quiet_openmp(os.environ)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        import xllamacpp

        server = xllamacpp.Server(_params(args))
    except Exception as exc:  # llama.cpp reports the reason on stderr; the parent summarises it
        _reply({"ok": False, "error": str(exc)})
        # A normal exit, not os._exit: llama.cpp writes its log from a worker thread that
        # only flushes in its static destructor, and the reason is in that log.
        return 3
    _reply({"ok": True, "address": server.listening_address, "pid": os.getpid()})
    threading.Event().wait()  # the watchdog ends the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
