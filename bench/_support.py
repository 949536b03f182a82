"""Shared pieces of the benchmarks: a fake model server process, a throwaway app, stats."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def fake_model_server(latency: float = 0.0, token_delay: float = 0.0) -> Iterator[str]:
    """The fake OpenAI server in its own process (so it does not share our event loop); yields base_url."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.fakes.openai_server",
        "--port",
        str(port),
        "--latency",
        str(latency),
        "--token-delay",
        str(token_delay),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"fake model server did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.05)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def bench_settings(
    base_url: str, *, models: Sequence[str] = ("fake",), **extra: object
) -> Iterator[Settings]:
    """Settings for a throwaway data folder whose models (default: one, `fake`; the first is
    the default model) are all served at `base_url`."""
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        config = Path(tmp) / "switchboard.toml"
        config.write_text(
            f'default_model = "{models[0]}"\n'
            + "".join(
                f"[models.{name}]\n"
                'provider = "openai-compatible"\n'
                'model = "fake-model"\n'
                f'base_url = "{base_url}"\n'
                "context_window = 16384\n"
                "input_price = 0.15\n"
                "output_price = 0.60\n"
                for name in models
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        yield Settings(config=config, data_dir=Path(tmp) / "data", environ=env, **extra)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]
