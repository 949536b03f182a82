"""OpenMP threads that sleep while idle, and explicit thread counts, for torch and llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chains.local import server_environment
from core.threads import openmp_threads, quiet_openmp, usable_cores

ROOT = Path(__file__).resolve().parent.parent
_OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def test_the_quiet_policy_fills_in_only_what_is_unset() -> None:
    env: dict[str, str] = {}
    quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    operator = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp(operator)
    assert operator == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "0"}


@pytest.mark.parametrize(
    ("value", "threads"), [("4", 4), ("3,2", 3), ("0", None), ("many", None), ("", None)]
)
def test_an_operators_thread_count_is_read_when_it_is_a_number(
    value: str, threads: int | None
) -> None:
    assert openmp_threads({"OMP_NUM_THREADS": value}) == threads
    assert openmp_threads({}) is None


def test_a_llama_cpp_server_starts_quiet_with_its_own_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in _OPENMP_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWITCHBOARD_SOMETHING", "kept")
    env = server_environment(3)
    assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"], env["OMP_NUM_THREADS"]) == (
        "PASSIVE",
        "0",
        "3",
    )
    assert env["SWITCHBOARD_SOMETHING"] == "kept"
    assert "OMP_WAIT_POLICY" not in os.environ  # the bot's own environment is left alone
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    env = server_environment(3)
    assert (env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"]) == ("ACTIVE", "3")


def test_a_server_runs_the_same_code_as_the_bot(monkeypatch: pytest.MonkeyPatch) -> None:
    import chains

    # From a worktree or a checkout, the child imports this `chains`, not an installed one.
    root = str(Path(chains.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert server_environment(1)["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    assert server_environment(1)["PYTHONPATH"] == root


def _load_embedder_and_show_openmp(extra_env: dict[str, str], threads: str) -> tuple[str, str]:
    """Load the local embedding model in a fresh interpreter with libgomp describing its settings."""
    env = {k: v for k, v in os.environ.items() if k not in _OPENMP_VARS}
    env.update(extra_env, OMP_DISPLAY_ENV="VERBOSE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    script = (
        "from knowledge.embeddings import LocalEmbedder\n"
        f"embedder = LocalEmbedder(threads={threads})\n"
        "embedder.embed_query('hello')\n"
        "import os, torch\n"
        "print('threads', torch.get_num_threads(), 'policy', os.environ['OMP_WAIT_POLICY'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return out.stdout, out.stderr


def _openmp_runtimes(stderr: str) -> list[str]:
    """The settings each OpenMP runtime printed as it started (torch's, scikit-learn's)."""
    blocks = [b.split("OPENMP DISPLAY ENVIRONMENT END")[0] for b in stderr.split("BEGIN")[1:]]
    assert blocks, "no OpenMP runtime started"
    return blocks


@pytest.mark.slow
def test_the_embedding_model_starts_openmp_quiet_with_an_explicit_thread_count() -> None:
    stdout, stderr = _load_embedder_and_show_openmp({}, threads="None")
    for runtime in _openmp_runtimes(stderr):
        # A spin count of 0 shows the policy was in place before the runtime loaded
        # (unset, libgomp shows PASSIVE too, but spins 300,000 times first).
        assert "OMP_WAIT_POLICY = 'PASSIVE'" in runtime and "GOMP_SPINCOUNT = '0'" in runtime
    assert f"threads {usable_cores()} policy PASSIVE" in stdout


@pytest.mark.slow
def test_the_operators_openmp_settings_win_over_the_embedders_defaults() -> None:
    stdout, stderr = _load_embedder_and_show_openmp(
        {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}, threads="None"
    )
    assert all("OMP_WAIT_POLICY = 'ACTIVE'" in r for r in _openmp_runtimes(stderr))
    assert "threads 1 policy ACTIVE" in stdout
