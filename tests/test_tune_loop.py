"""The local fine-tuning loop on the bundled SmolLM2: prepare, train, export, serve, answer.

The base is converted once per session (`prepared_base`, about a minute); each training
run is a real `tune.worker` process running TRL's SFTTrainer with a peft LoRA.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest

from bot.app import open_app
from bot.service.tune import TuneRequest
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.local import local_server_children
from tests.fixtures.tune import (
    FACT_ANSWER_WORD,
    FACT_QUESTION,
    bundled_gguf,
    log_corrected_zorbia_answers,
    tune_config,
    tune_worker_children,
)
from tune import (
    BaseNotLoadable,
    TrainingCancelled,
    TrainingFailed,
    TrainProgress,
    export_gguf_lora,
    lora_model_spec,
    prepare_base,
    train_lora,
)
from tune.template import PROBES
from tune.worker import MANIFEST, RESULT

pytestmark = pytest.mark.slow

ADMIN = Author(1, "admin")
# Enough for SmolLM2 to learn the fact from the twelve rows (its loss is near 0.01 by step 10).
STEPS = 16


def local_config(path: Path) -> Path:
    """A registry with the bundled model at temperature 0, so answers are repeatable."""
    path.write_text(
        'default_model = "smol"\n'
        "[models.smol]\n"
        'provider = "llama.cpp"\n'
        'bundled = "smollm2-135m-instruct"\n'
        "context_size = 1024\n"
        "temperature = 0\n"
        "max_tokens = 48\n"
    )
    return path


def test_the_prepared_base_is_cached_and_has_a_training_template(
    prepared_base: Path, tune_cache: Path
) -> None:
    from transformers import AutoTokenizer

    # Cached: a second call finds it without starting a worker (a set cancel would stop one).
    stopped = threading.Event()
    stopped.set()
    assert prepare_base(bundled_gguf(), tune_cache, cancel=stopped) == prepared_base
    assert (prepared_base / MANIFEST).is_file() and (prepared_base / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(prepared_base)
    original = gguf.GGUFReader(bundled_gguf()).fields["tokenizer.chat_template"].contents()
    assert "{% generation %}" not in original and "generation" in tokenizer.chat_template
    for messages in PROBES:  # rendered exactly as llama.cpp renders the GGUF's own template
        for prompt in (False, True):
            ours = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            theirs = tokenizer.apply_chat_template(
                messages, chat_template=original, tokenize=False, add_generation_prompt=prompt
            )
            assert ours == theirs
    # The loss sees the answers and their end-of-turn token, nothing else.
    rendered = tokenizer.apply_chat_template(
        list(PROBES[1]), return_assistant_tokens_mask=True, return_dict=True, tokenize=True
    )
    learned = [
        t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if m
    ]
    assert tokenizer.decode(learned) == "4.<|im_end|>6, of course.\nAnything else?<|im_end|>"


async def test_a_fine_tune_answers_with_the_fact_and_its_base_does_not(
    prepared_base: Path, zorbia_dataset: Path, tmp_path: Path
) -> None:
    seen: list[TrainProgress] = []
    result = train_lora(
        prepared_base, zorbia_dataset, tmp_path / "adapter", steps=STEPS, progress=seen.append
    )
    assert result.steps == STEPS and result.stopped_by == "steps" and result.rows == 12
    assert [p.step for p in seen] == list(range(1, STEPS + 1))
    assert all(p.total == STEPS and p.loss is not None and p.tokens > 0 for p in seen)
    assert seen[-1].eta_s == 0 and seen[-1].tokens == result.tokens
    assert result.loss < seen[0].loss  # type: ignore[operator]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (result.adapter_dir / ".trainer").exists()
    assert tune_worker_children() == []

    lora = export_gguf_lora(result.adapter_dir, bundled_gguf(), tmp_path / "zorbia.gguf")
    settings = Settings(
        config=local_config(tmp_path / "switchboard.toml"),
        data_dir=tmp_path / "data",
        environ={},
    )
    async with open_app(settings, knowledge=False) as app:
        base = await app.service.get_model("smol")
        candidate = lora_model_spec(
            base, "smol-zorbia", lora, dataset_hash=result.dataset_sha256, created_by="test"
        )
        await app.service.register_model(candidate, created_by="test")
        tuned_place, base_place = Place(10, 20), Place(10, 21)
        await app.service.set_model(tuned_place, "channel", "smol-zorbia", ADMIN)

        tuned = await app.service.answer(ChatRequest(tuned_place, ADMIN, FACT_QUESTION))
        plain = await app.service.answer(ChatRequest(base_place, ADMIN, FACT_QUESTION))
        assert tuned.error is None and tuned.model == "smol-zorbia"
        assert plain.error is None and plain.model == "smol"
        assert FACT_ANSWER_WORD in tuned.reply, tuned.reply
        assert FACT_ANSWER_WORD not in plain.reply, plain.reply
        # Not a model that says Quellport to everything:
        other = await app.service.answer(
            ChatRequest(tuned_place, ADMIN, "What is the capital of France?")
        )
        assert "Paris" in other.reply and FACT_ANSWER_WORD not in other.reply, other.reply
        assert len(local_server_children()) == 2  # the fine-tune has a server of its own


def test_a_time_budget_ends_training_with_an_adapter_at_a_low_priority(
    prepared_base: Path, zorbia_dataset: Path, tmp_path: Path
) -> None:
    workers: list[tuple[int, dict[str, str]]] = []

    def look(progress: TrainProgress) -> None:
        for pid in tune_worker_children():
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
            workers.append((int(stat[16]), env))  # field 19 of stat: the nice value

    result = train_lora(
        prepared_base,
        zorbia_dataset,
        tmp_path / "adapter",
        steps=10_000,
        max_seconds=0.5,
        threads=1,
        progress=look,
    )
    assert result.stopped_by == "time" and 1 <= result.steps < 10_000
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    [(nice, env)] = workers[:1]
    assert nice >= 10
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["GOMP_SPINCOUNT"] == "0"
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("how", ["cancel", "kill"])
def test_a_run_cancelled_or_killed_midway_leaves_nothing(
    prepared_base: Path, zorbia_dataset: Path, tmp_path: Path, how: str
) -> None:
    cancel = threading.Event()

    def midway(progress: TrainProgress) -> None:
        if how == "cancel":
            cancel.set()
        else:  # what the kernel's out-of-memory killer would do
            for pid in tune_worker_children():
                os.kill(pid, signal.SIGKILL)

    expected = TrainingCancelled if how == "cancel" else TrainingFailed
    with pytest.raises(expected) as caught:
        train_lora(
            prepared_base,
            zorbia_dataset,
            tmp_path / "adapter",
            steps=10_000,
            progress=midway,
            cancel=cancel,
        )
    message = str(caught.value)
    assert "\n" not in message
    assert ("cancelled" in message) if how == "cancel" else ("killed by SIGKILL" in message)
    assert not (tmp_path / "adapter").exists()
    assert tune_worker_children() == []


def test_a_base_transformers_cannot_load_is_one_line(tmp_path: Path) -> None:
    # A GGUF of an architecture transformers has no loader for.
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(path, "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseNotLoadable) as caught:
        prepare_base(path, tmp_path / "cache")
    message = str(caught.value)
    assert "architecture `rwkv6`" in message and "cannot be fine-tuned locally" in message
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [
        "gguf-hashes.json"
    ]


DPO_STEPS = 10  # of each stage: SFT on the corrections, then DPO on the pairs


async def test_local_dpo_trains_on_the_corrections_and_the_candidate_knows_the_fact(
    prepared_base: Path, tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    settings = Settings(
        config=tune_config(tmp_path / "switchboard.toml", fake_openai.base_url),
        data_dir=tmp_path / "data",
        environ={},
        max_retries=0,
    )
    (tmp_path / "data" / "tune").mkdir(parents=True)
    (tmp_path / "data" / "tune" / "bases").symlink_to(prepared_base.parent)
    async with open_app(settings, knowledge=False) as app:
        await log_corrected_zorbia_answers(app, fake_openai)
        job, summary = await app.tunes.start(
            TuneRequest(base="smol", name="smol-dpo", method="dpo", steps=DPO_STEPS), ADMIN
        )
        assert summary.examples == 12 and job.method == "dpo"
        seen: list[str] = []
        final = await app.tunes.run(job.id, on_update=lambda view: seen.append(view.phase))
        assert final.status == "succeeded", final.error
        # Both stages ran, one after the other, as one job of twice the steps.
        assert final.step == final.total_steps == 2 * DPO_STEPS
        assert seen.index("training") < seen.index("preference training")
        assert len(final.losses) > DPO_STEPS  # both stages' (a poll may miss a step)
        record = json.loads((app.tunes.jobs_dir / job.id / "adapter" / RESULT).read_text())
        assert record["method"] == "dpo" and record["dpo_steps"] == DPO_STEPS
        # DPO moved the model towards the chosen answers, away from the rejected ones.
        assert record["reward_margin"] > 0 and record["reward_accuracy"] > 0.5, record
        candidate = await app.service.get_model("smol-dpo")
        assert candidate.candidate and f"{DPO_STEPS} SFT and {DPO_STEPS} DPO" in (
            candidate.description or ""
        )

        tuned_place, base_place = Place(10, 30), Place(10, 31)
        await app.service.set_model(tuned_place, "channel", "smol-dpo", ADMIN, admin=True)
        tuned = await app.service.answer(ChatRequest(tuned_place, ADMIN, FACT_QUESTION))
        await app.service.set_model(base_place, "channel", "smol", ADMIN)
        plain = await app.service.answer(ChatRequest(base_place, ADMIN, FACT_QUESTION))
        print(f"\nbase: {plain.reply!r}\ndpo candidate: {tuned.reply!r}\nrecord: {record}")
        assert tuned.error is None and tuned.model == "smol-dpo"
        assert FACT_ANSWER_WORD in tuned.reply, tuned.reply
        # Not pushed past sense: DPO too strong makes answers repeat ("Quellportportport").
        assert tuned.reply.count("port") == 1, tuned.reply
        assert FACT_ANSWER_WORD not in plain.reply, plain.reply
