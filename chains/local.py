"""Local open-weights models: llama.cpp servers on loopback, one child process per GGUF.

`LocalServers.ensure(spec)` returns the OpenAI-compatible base URL of a running
llama.cpp server for a registry entry with `provider = "llama.cpp"`, starting it on first
use (`python -m chains.local_server`, see there), reusing it afterwards, restarting it if
it died, and stopping the least recently used one when more than `max_loaded` are up.
The chat model itself is the ordinary `ChatOpenAI` pointed at that URL.

Call `ensure` for every request (it is a dictionary lookup while the server is up): a
restarted server keeps its port when it can, but may not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from chains.gguf import (
    BUNDLED_SAMPLING,
    GGUFCorrupt,
    GGUFError,
    GGUFInfo,
    check_lora,
    check_memory,
    read_gguf_info,
    resolve_gguf,
)
from core.errors import ConfigError, UserError
from core.threads import quiet_openmp, usable_cores

__all__ = [
    "LocalServerDied",
    "LocalServerError",
    "LocalServers",
    "PortInUse",
    "default_context_size",
    "default_threads",
    "gguf_spec",
    "local_http_client",
    "server_environment",
    "validate_gguf",
]

logger = logging.getLogger(__name__)

PROVIDER = "llama.cpp"
DEFAULT_CONTEXT = 4096
_STOP_GRACE = 3.0
_LOG_TAIL_BYTES = 64 * 1024
_CODE_ROOT = Path(__file__).resolve().parent.parent


class LocalServerError(UserError):
    """A local llama.cpp server could not be started or stopped answering."""


class PortInUse(LocalServerError, ConfigError):
    """The port a local model was told to use is taken by another program."""


class LocalServerDied(LocalServerError):
    """The llama.cpp server of a local model exited (it is restarted on the next request)."""


@dataclass(frozen=True, slots=True)
class _Launch:
    """Everything that decides how a server is started; a change means a restart."""

    path: Path
    ctx: int
    parallel: int
    threads: int
    port: int | None
    sampling: tuple[tuple[str, float], ...] = ()
    lora: Path | None = None


def default_threads() -> int:
    """llama.cpp threads when the registry does not say: all usable cores but one (left to the bot), at most 8.

    On a busy 2-core machine one thread held ~80 tokens/s where two swung between 5 and
    120; past ~8 threads decoding a small model gains nothing.
    """
    return max(1, min(8, usable_cores() - 1))


def server_environment(threads: int) -> dict[str, str]:
    """The environment a llama.cpp server starts with: this one's, plus how its OpenMP threads behave.

    Idle OpenMP threads sleep instead of spinning (`core.threads.quiet_openmp`: where the
    operator has not set the variables), and OpenMP's own thread count is the server's
    explicit `threads`, so no OpenMP region starts one thread per core behind its back.
    The code folder this process imports `chains` from goes first on `PYTHONPATH`.
    """
    env = dict(os.environ)
    quiet_openmp(env)
    env["OMP_NUM_THREADS"] = str(threads)
    # The child runs the same `chains` as this process, not whichever one is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_CODE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def default_context_size(info: GGUFInfo) -> int:
    """Context tokens per conversation when the registry does not say: the model's own, at most 4096."""
    return min(info.context_length or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


class _Server:
    """One running child process and what is needed to talk about it."""

    def __init__(
        self, name: str, launch: _Launch, proc: subprocess.Popen[bytes], log: IO[bytes]
    ) -> None:
        self.name = name
        self.launch = launch
        self.proc = proc
        self.log = log
        self.base_url = ""
        self.port = 0
        self.spec_key: tuple[Any, ...] = ()

    @property
    def alive(self) -> bool:
        """Whether the child process is still running (reaps it once it has exited)."""
        return self.proc.poll() is None

    def log_errors(self, limit: int = 3) -> list[str]:
        """The last distinct error lines llama.cpp wrote, without timestamps."""
        with contextlib.suppress(OSError, ValueError):
            size = os.fstat(self.log.fileno()).st_size
            self.log.seek(max(0, size - _LOG_TAIL_BYTES))
            lines = self.log.read().decode("utf-8", "replace").splitlines()
            errors: list[str] = []
            for line in lines:
                match = re.match(r"^[\d.]+ [EW] (?:\w+\s+)?(.*)$", line.strip())
                text = (match.group(1) if match else line).strip()
                if text and (match or "error" in text.lower()) and text not in errors:
                    errors.append(text)
            return errors[-limit:]
        return []

    def describe_exit(self) -> str:
        """How the process ended, in words ("killed by SIGKILL", "exit status 3")."""
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    async def stop(self) -> None:
        """Close the parent pipe (the child exits at once), then SIGTERM, then SIGKILL."""
        proc = self.proc
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        if not await _wait(proc, _STOP_GRACE):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            if not await _wait(proc, _STOP_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await _wait(proc, 30.0)
        self.close_files()

    def kill_now(self) -> None:
        """Synchronous last resort for exit paths that cannot await."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.close_files()

    def close_files(self) -> None:
        """Close our ends of the child's pipes and its log."""
        for stream in (self.proc.stdin, self.proc.stdout, self.log):
            with contextlib.suppress(OSError, ValueError):
                if stream:
                    stream.close()


async def _wait(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Wait for a child to exit without blocking the loop or tying it to one event loop."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _start_server(name: str, launch: _Launch, startup_timeout: float) -> _Server:
    """Spawn the child, read its one-line answer, wait for /health; clean up on any failure."""
    server = _spawn(name, launch)
    try:
        await _await_ready(server, startup_timeout)
    except BaseException:
        await server.stop()
        raise
    logger.info("llama.cpp server for %s on %s (pid %d)", name, server.base_url, server.proc.pid)
    return server


def _spawn(name: str, launch: _Launch) -> _Server:
    """Start the child process (fast: fork/exec only; loading happens in the child).

    Called on the event loop's own thread on purpose: PR_SET_PDEATHSIG fires when the
    *thread* that forked the child ends, and a worker thread of to_thread may end any time.
    """
    # llama.cpp's log goes to an unlinked temporary file: readable for error reports,
    # gone with the last descriptor, and it never blocks the child as a full pipe would.
    fd, log_path = tempfile.mkstemp(prefix="switchboard-llama-", suffix=".log")
    os.close(fd)
    try:
        writer = open(log_path, "ab")  # O_APPEND: the child's writes ignore our read offset
        log = open(log_path, "rb")
    finally:
        os.unlink(log_path)
    command = [
        sys.executable,
        "-m",
        "chains.local_server",
        "--model",
        str(launch.path),
        *(["--lora", str(launch.lora)] if launch.lora else []),
        "--port",
        str(launch.port or 0),
        "--ctx",
        str(launch.ctx),
        "--parallel",
        str(launch.parallel),
        "--threads",
        str(launch.threads),
        "--parent-pid",
        str(os.getpid()),
    ]
    for key, value in launch.sampling:
        command += [f"--{key.replace('_', '-')}", str(value)]
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=writer,
            env=server_environment(launch.threads),
            close_fds=True,
            # Out of the terminal's process group: Ctrl-C goes to the parent, which stops us in order.
            start_new_session=True,
        )
    except BaseException:
        log.close()
        raise
    finally:
        writer.close()
    return _Server(name, launch, proc, log)


async def _await_ready(server: _Server, startup_timeout: float) -> None:
    """Read the child's ready line, then poll /health until the model answers."""
    deadline = time.monotonic() + startup_timeout
    assert server.proc.stdout is not None
    reading = asyncio.ensure_future(asyncio.to_thread(server.proc.stdout.readline))
    try:
        line = await asyncio.wait_for(asyncio.shield(reading), timeout=startup_timeout)
    except TimeoutError:
        # Killing the child ends the blocked readline in its thread.
        server.kill_now()
        with contextlib.suppress(Exception):
            await reading
        raise LocalServerError(
            f"The local model `{server.name}` did not load within {startup_timeout:.0f} s. "
            "The machine may be too busy or the model too large; try a smaller model."
        ) from None
    try:
        answer = (
            json.loads(line) if line.strip() else {"ok": False, "error": "exited during start-up"}
        )
    except json.JSONDecodeError:
        answer = {"ok": False, "error": line.decode("utf-8", "replace").strip()}
    if not answer.get("ok"):
        await _wait(server.proc, 5.0)
        raise _start_failure(server)
    server.base_url = str(answer["address"]).rstrip("/") + "/v1"
    server.port = int(str(answer["address"]).rsplit(":", 1)[1])
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while True:
            if not server.alive:
                raise _start_failure(server)
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(server.base_url.removesuffix("/v1") + "/health")
                if response.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"The local model `{server.name}` started but did not become healthy within {startup_timeout:.0f} s."
                )
            await asyncio.sleep(0.05)


def _start_failure(server: _Server) -> UserError:
    """Turn a child that could not start into a message a person can act on."""
    errors = server.log_errors(limit=6)
    joined = " ".join(errors)
    if "couldn't bind" in joined:
        return PortInUse(
            f"Port {server.launch.port} on 127.0.0.1 is already in use, so the local model `{server.name}` "
            "cannot listen there. Stop the other program or choose another `port` (or none: a free one is picked)."
        )
    if server.launch.lora is not None and "lora" in joined.lower():
        detail = "; ".join(e for e in errors if "lora" in e.lower())[-400:]
        return GGUFCorrupt(
            f"llama.cpp could not load the LoRA adapter {server.launch.lora} of model `{server.name}`: {detail}. "
            "Export the adapter again from the same base model."
        )
    if (
        "failed to load model" in joined
        or "error loading model" in joined
        or "gguf" in joined.lower()
    ):
        detail = (
            "; ".join(e for e in errors if "failed to load model" not in e)[-400:]
            or "llama.cpp could not read it"
        )
        return GGUFCorrupt(
            f"llama.cpp could not load the GGUF file {server.launch.path} for model `{server.name}`: {detail}. "
            "The file may be damaged or truncated (download it again) or need a newer llama.cpp."
        )
    detail = "; ".join(errors)[-400:] or server.describe_exit()
    return LocalServerError(f"The local model `{server.name}` failed to start ({detail}).")


def _launch_for(spec: Any, info: GGUFInfo, lora: Path | None = None) -> _Launch:
    """How to start the server for a registry entry (with its checked LoRA adapter, if any)."""
    ctx = getattr(spec, "context_size", None) or default_context_size(info)
    parallel = getattr(spec, "parallel", None) or 1
    threads = getattr(spec, "threads", None) or default_threads()
    if ctx < 16 or parallel < 1 or threads < 0:
        raise ConfigError(
            f"Model `{spec.name}`: context_size, parallel and threads must be positive."
        )
    sampling = tuple(sorted(BUNDLED_SAMPLING.get(getattr(spec, "bundled", None) or "", {}).items()))
    return _Launch(
        path=info.path,
        ctx=int(ctx),
        parallel=int(parallel),
        threads=int(threads),
        port=None,
        sampling=sampling,
        lora=lora,
    )


def _checked_lora(spec: Any, base: GGUFInfo) -> Path | None:
    """The entry's LoRA adapter (`lora`), checked to be a GGUF LoRA for its base; None without one."""
    lora = getattr(spec, "lora", None)
    if not lora:
        return None
    return check_lora(Path(lora), base, spec.name).path


def _spec_key(spec: Any) -> tuple[Any, ...]:
    """The registry fields that decide how a model's server runs."""
    return tuple(
        getattr(spec, field, None)
        for field in ("path", "bundled", "lora", "context_size", "parallel", "threads")
    )


class LocalServers:
    """The llama.cpp servers of local models: started on demand, reused, restarted, evicted LRU."""

    def __init__(self, max_loaded: int = 2, *, startup_timeout: float = 60.0) -> None:
        if max_loaded < 1:
            raise ConfigError("max_local_models must be at least 1.")
        self.max_loaded = max_loaded
        self.startup_timeout = startup_timeout
        self._servers: OrderedDict[str, _Server] = OrderedDict()  # least recently used first
        self._locks: dict[str, asyncio.Lock] = {}
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    async def ensure(self, spec: Any) -> str:
        """The base URL (`http://127.0.0.1:PORT/v1`) of a healthy server for `spec`, starting it if needed."""
        if self._closed:
            raise LocalServerError("Local models are shutting down.")
        name = spec.name
        key = _spec_key(spec)
        lock = self._locks.setdefault(name, asyncio.Lock())
        server = self._servers.get(name)
        if server is not None and server.alive and server.spec_key == key and not lock.locked():
            self._servers.move_to_end(name)
            return server.base_url
        async with lock:
            server = self._servers.get(name)
            if server is not None and server.alive and server.spec_key == key:
                # Started by a concurrent ensure() while this one waited for the lock.
                self._servers.move_to_end(name)
                return server.base_url
            path = resolve_gguf(spec)
            info = await asyncio.to_thread(read_gguf_info, path)
            lora = await asyncio.to_thread(_checked_lora, spec, info)
            launch = _launch_for(spec, info, lora)
            if server is not None:
                if not server.alive:
                    logger.warning(
                        "llama.cpp server for %s died (%s); restarting",
                        name,
                        server.describe_exit(),
                    )
                    # Keep the port so clients built on the old URL keep working.
                    if launch.port is None:
                        launch = dataclasses.replace(launch, port=server.port or None)
                self._servers.pop(name, None)
                await server.stop()
            await self._evict(keep=name, room_for=1)
            check_memory(info, launch.ctx * launch.parallel, name)
            try:
                server = await _start_server(name, launch, self.startup_timeout)
            except PortInUse:
                # The port we hoped to keep was taken meanwhile: any free one will do.
                launch = dataclasses.replace(launch, port=None)
                server = await _start_server(name, launch, self.startup_timeout)
            if self._closed:  # aclose() ran while this server was starting
                await server.stop()
                raise LocalServerError("Local models are shutting down.")
            server.spec_key = key
            self._servers[name] = server
            return server.base_url

    def http_client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        """One shared client for ChatOpenAI(http_async_client=...) on local models; closed by aclose().

        See `local_http_client`: a kept-alive connection to llama.cpp fails now and then
        after a streamed reply, which costs a retry with back-off.
        """
        if self._http is None or self._http.is_closed:
            self._http = local_http_client(timeout)
        return self._http

    def is_alive(self, spec: Any) -> bool:
        """Whether a server for `spec` is loaded and its process is running."""
        server = self._servers.get(spec.name)
        return server is not None and server.alive

    async def raise_if_dead(self, spec: Any, grace: float = 2.0) -> None:
        """After a failed request: raise LocalServerDied if the model's server has exited or is exiting.

        The client sees the connection drop a moment before the dying process can be
        reaped, so a server that no longer answers /health gets up to `grace` seconds to exit.
        """
        server = self._servers.get(spec.name)
        if server is None:
            return
        if server.alive and not await _healthy(server):
            await _wait(server.proc, grace)
        if not server.alive:
            errors = server.log_errors()
            logger.error(
                "llama.cpp server for %s exited (%s): %s",
                spec.name,
                server.describe_exit(),
                " | ".join(errors),
            )
            raise LocalServerDied(
                f"The local model `{spec.name}` stopped while answering (llama.cpp {server.describe_exit()}). "
                "It restarts with the next message; if this keeps happening the model may be too large for this machine."
            )

    def pid(self, spec: Any) -> int | None:
        """The process id of the server for `spec`, if one was started."""
        server = self._servers.get(spec.name)
        return server.proc.pid if server is not None else None

    def loaded(self) -> list[str]:
        """Names of the models with a server, least recently used first."""
        return list(self._servers)

    async def stop(self, spec: Any) -> None:
        """Stop the server for `spec`, if any."""
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            server = self._servers.pop(spec.name, None)
            if server is not None:
                await server.stop()

    async def _evict(self, keep: str, room_for: int) -> None:
        """Stop least recently used idle servers until `room_for` more fit under max_loaded."""
        for name in list(self._servers):
            if len(self._servers) + room_for <= self.max_loaded:
                return
            lock = self._locks.setdefault(name, asyncio.Lock())
            if name == keep or lock.locked():
                continue  # being started or checked right now: in use
            server = self._servers[name]
            if server.alive and await _busy(server):
                continue
            async with lock:
                if self._servers.get(name) is server:
                    logger.info("stopping llama.cpp server for %s (least recently used)", name)
                    del self._servers[name]
                    await server.stop()
        if len(self._servers) + room_for > self.max_loaded:
            logger.warning("more than %d local models loaded: the others are busy", self.max_loaded)

    async def aclose(self) -> None:
        """Stop every server and wait for the processes to exit."""
        self._closed = True
        servers = list(self._servers.values())
        self._servers.clear()
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> LocalServers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _healthy(server: _Server) -> bool:
    """Whether the server answers /health right now."""
    try:
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            response = await client.get(server.base_url.removesuffix("/v1") + "/health")
            return response.status_code == 200
    except httpx.HTTPError:
        return False


async def _busy(server: _Server) -> bool:
    """Whether any slot of the server is generating (so stopping it would cut a reply off)."""
    try:
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            response = await client.get(server.base_url.removesuffix("/v1") + "/slots")
            return any(slot.get("is_processing") for slot in response.json())
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return False


def local_http_client(timeout: float = 60.0) -> httpx.AsyncClient:
    """An HTTP client for talking to llama.cpp servers (pass it to ChatOpenAI as `http_async_client`).

    Without keep-alive: after a streamed reply llama.cpp's server sometimes closes the
    connection without saying so, and the next request sent on it fails ("Server
    disconnected without sending a response"); a new loopback connection costs ~0.1 ms.
    No proxies either: the traffic never leaves 127.0.0.1.
    """
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        trust_env=False,
    )


async def validate_gguf(path: Path, *, startup_timeout: float = 60.0) -> GGUFInfo:
    """Check a GGUF file for `models add-gguf`: it exists, is a GGUF, fits in memory, and llama.cpp loads it."""
    info = await asyncio.to_thread(read_gguf_info, path)
    ctx = min(default_context_size(info), 512)  # a short context: only the load is being tested
    check_memory(info, ctx, path.name)
    server = await _start_server(
        path.name, _Launch(info.path, ctx, 1, default_threads(), None), startup_timeout
    )
    await server.stop()
    return info


def gguf_spec(name: str, path: Path, **opts: Any) -> dict[str, Any]:
    """The registry entry for a GGUF file (`models add-gguf`), ready for ModelRepository.add."""
    path = Path(path).expanduser().resolve()
    info: GGUFInfo | None = None
    with contextlib.suppress(GGUFError):
        info = read_gguf_info(path)
    context_size = opts.pop("context_size", None) or (default_context_size(info) if info else None)
    entry: dict[str, Any] = {
        "name": name,
        "provider": PROVIDER,
        "model": name,
        "path": str(path),
        "context_window": context_size or DEFAULT_CONTEXT,
        "open_weights": True,
    }
    if context_size:
        entry["context_size"] = context_size
    if info is not None:
        label = info.name or path.stem
        entry["description"] = (
            f"{label}: local GGUF run with llama.cpp ({info.size_bytes / 1024**3:.2f} GiB)."
        )
    entry.update({key: value for key, value in opts.items() if value is not None})
    return entry
