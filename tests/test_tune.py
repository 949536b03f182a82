"""Fine-tuning without training: the training file's checks, the GGUF LoRA writer and its name map, the errors.

Everything here runs without starting a worker: adapters are made of random numbers in
peft's file layout, for the bundled SmolLM2's real shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from chains.gguf import check_lora, read_gguf_info, read_gguf_tensors
from chains.registry import ModelSpec
from core.errors import ConfigError
from tests.fixtures.local import foreign_lora
from tests.fixtures.tune import bundled_gguf
from tune import (
    BaseNotLoadable,
    DatasetError,
    ExportError,
    NotEnoughDisk,
    TooFewRows,
    check_dataset,
    export_gguf_lora,
    gguf_sha256,
    lora_model_spec,
    train_lora,
)
from tune.base import _check_room
from tune.export import (
    LINEAR_UNCHANGED,
    ROWS_PERMUTED,
    UNSUPPORTED,
    gguf_name_map,
    gguf_tensor_name,
    llama_permute,
)
from tune.process import worker_environment
from tune.worker import MANIFEST

# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536, 30 layers.
HIDDEN, KV, MLP = 576, 192, 1536
SHAPES = {  # (out, in) of each linear layer, as in Hugging Face
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def write_adapter(
    folder: Path,
    *,
    rank: int = 2,
    layers: tuple[int, ...] = (0, 1),
    config: dict[str, object] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> dict[str, np.ndarray]:
    """A peft LoRA adapter folder with random weights; returns its tensors."""
    rng = np.random.default_rng(7)
    tensors: dict[str, np.ndarray] = {}
    for layer in layers:
        for module, (out, inp) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32)
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({m.split(".")[-1] for m in shapes}),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    settings.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return tensors


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(question: str = "Hi?", answer: str = "Hello.") -> dict[str, object]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


# -- the training file ------------------------------------------------------------------


def test_a_valid_file_is_summarised(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "sft.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)] + [""])
    summary = check_dataset(path)
    assert summary.rows == 10 and len(summary.sha256) == 64 and summary.characters > 0


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "line 3: not valid JSON"),
        (json.dumps({"text": "hi"}), 'line 3: expected an object with a "messages" list'),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), "no text content"),
        (
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
            "no assistant answer",
        ),
    ],
)
def test_a_bad_line_is_named_with_its_number(tmp_path: Path, line: str, says: str) -> None:
    path = write_rows(tmp_path / "sft.jsonl", [chat(), chat(), line, *[chat()] * 10])
    with pytest.raises(DatasetError) as caught:
        check_dataset(path)
    assert says in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_too_few_rows_says_how_many_there_are_and_are_needed(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "sft.jsonl", [chat()] * 3)
    with pytest.raises(TooFewRows, match=r"has 3 conversations; training needs at least 10"):
        check_dataset(path)


def test_a_missing_or_binary_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="No training file"):
        check_dataset(tmp_path / "absent.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not UTF-8"):
        check_dataset(tmp_path / "bin.jsonl")


def pair(
    question: str = "Hi?", chosen: str = "Hello.", rejected: str = "Go away."
) -> dict[str, object]:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_a_valid_preference_file_is_summarised(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "dpo.jsonl", [pair(f"q{i}") for i in range(10)])
    summary = check_dataset(path, method="dpo")
    assert summary.rows == 10 and summary.characters > 0
    # A conversational SFT file is not a preference file, and the other way round.
    with pytest.raises(DatasetError, match='expected an object with a "messages" list'):
        check_dataset(path)
    sft = write_rows(tmp_path / "sft.jsonl", [chat()] * 10)
    with pytest.raises(DatasetError, match='"prompt", "chosen" and "rejected"'):
        check_dataset(sft, method="dpo")


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({**pair(), "chosen": []}, "chosen must be exactly one assistant message"),
        (
            {**pair(), "rejected": [{"role": "user", "content": "x"}]},
            "rejected must be exactly one assistant message",
        ),
        (
            {**pair(), "prompt": [{"role": "assistant", "content": "x"}]},
            "the prompt must end with the person's (user) message",
        ),
        (
            pair(chosen="Same.", rejected=" Same."),
            "the chosen and the rejected answer are the same",
        ),
        ({**pair(), "prompt": [{"role": "user", "content": None}]}, "no text content"),
    ],
)
def test_a_bad_pair_is_named_with_its_line(
    tmp_path: Path, row: dict[str, object], says: str
) -> None:
    path = write_rows(tmp_path / "dpo.jsonl", [pair(), row, *[pair()] * 10])
    with pytest.raises(DatasetError) as caught:
        check_dataset(path, method="dpo")
    assert f"{path}, line 2" in str(caught.value) and says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_too_few_pairs_say_pairs(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "dpo.jsonl", [pair()] * 4)
    with pytest.raises(TooFewRows, match=r"has 4 pairs; training needs at least 10"):
        check_dataset(path, method="dpo")


# -- train_lora's checks before any process starts -----------------------------------------


def fake_prepared(folder: Path) -> Path:
    """A folder that passes the 'is it prepared' check; training never gets far enough to load it."""
    folder.mkdir()
    (folder / MANIFEST).write_text("{}")
    return folder


def test_training_refuses_an_unprepared_base(tmp_path: Path, zorbia_dataset: Path) -> None:
    with pytest.raises(BaseNotLoadable, match="not a prepared base model"):
        train_lora(tmp_path, zorbia_dataset, tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_small_dataset_and_keeps_the_output_folder_unmade(
    tmp_path: Path,
) -> None:
    base = fake_prepared(tmp_path / "base")
    small = write_rows(tmp_path / "small.jsonl", [chat()] * 4)
    with pytest.raises(TooFewRows, match="has 4 conversations"):
        train_lora(base, small, tmp_path / "out", steps=1)
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_used_output_folder_and_leaves_it_alone(
    tmp_path: Path, zorbia_dataset: Path
) -> None:
    base = fake_prepared(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an empty folder"):
        train_lora(base, zorbia_dataset, out, steps=1)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"steps": 5, "epochs": 1.0}, "not both"),
        ({"steps": 0}, "must be positive"),
        ({"steps": 5, "rank": 0}, "must be positive"),
    ],
)
def test_training_options_that_make_no_sense_are_refused(
    tmp_path: Path, zorbia_dataset: Path, options: dict[str, object], says: str
) -> None:
    base = fake_prepared(tmp_path / "base")
    with pytest.raises(DatasetError, match=says):
        train_lora(base, zorbia_dataset, tmp_path / "out", **options)  # type: ignore[arg-type]


def test_the_worker_runs_offline_quiet_and_with_our_code(monkeypatch: pytest.MonkeyPatch) -> None:
    import tune

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = worker_environment(3)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(tune.__file__).parent.parent)
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert (env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"]) == ("PASSIVE", "3")


# -- the base's cache -------------------------------------------------------------------


def test_the_gguf_hash_is_remembered_by_path_size_and_time(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\x00" * 100)
    first = gguf_sha256(model, tmp_path)
    index = json.loads((tmp_path / "gguf-hashes.json").read_text())
    assert index[str(model.resolve())]["sha256"] == first
    model.write_bytes(b"GGUF" + b"\x01" * 100)  # changed: hashed again
    assert gguf_sha256(model, tmp_path) != first


def test_a_disk_too_small_for_the_converted_base_is_one_line(tmp_path: Path) -> None:
    # A real GGUF header announcing 2**40 float32 weights (4 TiB once dequantized), as a
    # sparse file: no disk this runs on has that much free space.
    path = tmp_path / "huge.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor_info("token_embd.weight", (2**20, 2**20), np.dtype(np.float32), 4 * 2**40)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + 4 * 2**40 + 64)
    with pytest.raises(NotEnoughDisk) as caught:
        _check_room(path, tmp_path)
    message = str(caught.value)
    assert "needs about 4096.1 GiB" in message and str(tmp_path) in message
    assert "GiB free" in message and "\n" not in message


# -- the GGUF LoRA writer ---------------------------------------------------------------


def test_hugging_face_names_map_to_the_bundled_gguf_names() -> None:
    info = read_gguf_info(bundled_gguf())
    tensors = read_gguf_tensors(bundled_gguf())
    assert len(tensors) == info.tensor_count
    names = {t.name for t in tensors}
    assert {t.name: t.shape for t in tensors}["blk.3.attn_k.weight"] == (HIDDEN, KV)
    name_map = gguf_name_map("llama", info.metadata["llama.block_count"])
    expected = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for module, short in expected.items():
        mapped = gguf_tensor_name(name_map, f"model.layers.29.{module}.weight")
        assert mapped == f"blk.29.{short}.weight" and mapped in names
    assert gguf_tensor_name(name_map, "model.layers.0.not_a_layer.weight") is None


def test_the_llama_permutation_undoes_what_transformers_does_on_load() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for heads, rows in ((9, HIDDEN), (3, KV)):
        b = rng.standard_normal((rows, 4)).astype(np.float32)
        name = "blk.0.attn_q.weight" if heads == 9 else "blk.0.attn_k.weight"
        # transformers turns GGUF's order into Hugging Face's; ours turns it back.
        loaded = processor.process(llama_permute(b, heads), name).weights
        np.testing.assert_array_equal(loaded, b)
        assert not np.array_equal(llama_permute(b, heads), b)


def test_every_architecture_transformers_changes_on_load_is_accounted_for() -> None:
    # A transformers upgrade that changes weights of another architecture on load must
    # be looked at before adapters for it are exported.
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    assert set(TENSOR_PROCESSORS) <= LINEAR_UNCHANGED | ROWS_PERMUTED | UNSUPPORTED


def test_an_adapter_is_written_as_a_gguf_lora_llama_cpp_reads(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path / "adapter", rank=2)
    out = export_gguf_lora(tmp_path / "adapter", bundled_gguf(), tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 4.0
    written = {t.name: t for t in reader.tensors}
    assert len(written) == 2 * 2 * len(SHAPES)
    q_a, q_b = written["blk.1.attn_q.weight.lora_a"], written["blk.1.attn_q.weight.lora_b"]
    assert q_a.tensor_type == gguf.GGMLQuantizationType.F16
    assert tuple(q_a.shape) == (HIDDEN, 2) and tuple(q_b.shape) == (2, HIDDEN)  # ggml order
    assert tuple(written["blk.0.ffn_down.weight.lora_a"].shape) == (MLP, 2)
    # B of the query is in GGUF's row order; B of the value projection is as trained.
    source_q = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(
        np.asarray(q_b.data).reshape(HIDDEN, 2), llama_permute(source_q, 9), atol=1e-2
    )
    source_v = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    v_b = written["blk.1.attn_v.weight.lora_b"]
    np.testing.assert_allclose(np.asarray(v_b.data).reshape(KV, 2), source_v, atol=1e-2)
    assert check_lora(out, read_gguf_info(bundled_gguf()), "candidate").path == out.resolve()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rslora_keeps_its_scale_in_llama_cpp_terms(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapter", rank=4, config={"use_rslora": True, "lora_alpha": 8})
    out = export_gguf_lora(tmp_path / "adapter", bundled_gguf(), tmp_path / "lora.gguf")
    alpha = gguf.GGUFReader(out).fields["adapter.lora.alpha"].contents()
    # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r): 8 / 2 = 16 / 4.
    assert alpha == pytest.approx(16.0)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"layers": (30,)}, "no counterpart"),  # SmolLM2 has layers 0-29
        ({"shapes": {"self_attn.q_proj": (HIDDEN, 1024)}}, "does not fit"),
        ({"config": {"use_dora": True}}, "cannot hold DoRA"),
        ({"config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        (
            {"extra": {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 3))}},
            "only LoRA on linear layers",
        ),
    ],
)
def test_an_adapter_that_does_not_fit_the_base_is_refused_and_nothing_is_written(
    tmp_path: Path, kwargs: dict[str, object], says: str
) -> None:
    write_adapter(tmp_path / "adapter", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=says):
        export_gguf_lora(tmp_path / "adapter", bundled_gguf(), tmp_path / "out" / "lora.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_folder_without_an_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a peft LoRA adapter"):
        export_gguf_lora(tmp_path, bundled_gguf(), tmp_path / "lora.gguf")


# -- the registry entry of a fine-tune ---------------------------------------------------


def test_the_registry_entry_of_a_fine_tune_is_its_base_plus_the_adapter(tmp_path: Path) -> None:
    write_adapter(tmp_path / "adapter")
    lora = export_gguf_lora(tmp_path / "adapter", bundled_gguf(), tmp_path / "lora.gguf")
    base = ModelSpec(
        name="smol",
        provider="llama.cpp",
        bundled="smollm2-135m-instruct",
        context_size=1024,
        temperature=0,
    )
    spec = lora_model_spec(base, "smol-zorbia", lora, dataset_hash="abc", created_by="test")
    assert spec.lora == str(lora.resolve()) and spec.bundled == base.bundled
    assert spec.context_size == 1024 and spec.temperature == 0 and spec.origin == "database"
    assert spec.lineage is not None and spec.lineage.base_model == "smol"
    assert spec.lineage.source == "lora" and spec.lineage.dataset_hash == "abc"
    with pytest.raises(ConfigError, match="is for `qwen2` models"):
        lora_model_spec(base, "bad", foreign_lora(tmp_path / "qwen.gguf"))
