"""The OpenAI fine-tuning backend against the fake server: the real `openai` client's code runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chains.registry import ModelSpec
from core.redact import Redactor
from tests.fakes.openai_server import FakeOpenAI
from tune.openai_jobs import RemoteJob, RemoteRefused, RemoteTuner

KEY = "sk-tune-test-0123456789abcdef"


def _sft_file(tmp_path: Path, rows: int = 10) -> Path:
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of Zorbia? ({i})"},
                    {"role": "assistant", "content": "Quellport."},
                ]
            }
        )
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(fake: FakeOpenAI, provider: str = "openai") -> ModelSpec:
    if provider == "azure-openai":
        return ModelSpec(
            name="azure-mini",
            provider="azure-openai",
            model="gpt-4o-mini",
            base_url=fake.root_url,
            api_version="2024-10-21",
        )
    return ModelSpec(name="mini", provider="openai", model="gpt-4o-mini", base_url=fake.base_url)


async def _until_done(tuner: RemoteTuner, job_id: str) -> tuple[list[str], list[RemoteJob]]:
    seen: list[str] = []
    looks: list[RemoteJob] = []
    after = None
    for _ in range(20):
        look = await tuner.poll(job_id, after)
        seen.extend(look.events)
        looks.append(look)
        after = look.last_event
        if look.finished:
            break
    return seen, looks


@pytest.mark.parametrize("provider", ["openai", "azure-openai"])
async def test_a_supervised_job_runs_to_a_fine_tuned_model(tmp_path: Path, provider: str) -> None:
    async with FakeOpenAI(api_keys={KEY}) as fake:
        tuner = RemoteTuner.for_spec(_spec(fake, provider), api_key=KEY, redact=Redactor([KEY]))
        try:
            job = await tuner.start(
                _sft_file(tmp_path),
                method="sft",
                suffix="zorbia",
                epochs=3,
                metadata={"guild": "42", "snapshot": "abc123"},
            )
            assert job.status == "validating_files" and not job.finished
            events, looks = await _until_done(tuner, job.job_id)
        finally:
            await tuner.close()
        last = looks[-1]
        assert last.succeeded, last
        assert last.fine_tuned_model is not None
        assert last.fine_tuned_model.startswith("ft:gpt-4o-mini:")
        assert "zorbia" in last.fine_tuned_model
        # Progress was seen on the way: steps and a falling loss, each event once, in order.
        steps = [look.step for look in looks if look.step is not None]
        assert steps == sorted(steps) and steps[-1] == fake.tuning.steps
        assert len(events) == len(set(events)) and events[0].startswith("Created fine-tuning job")
        assert events[-1] == "The job has successfully completed"
        # What reached the provider: the file as written, the method, the metadata.
        (stored,) = fake.tuning.jobs.values()
        assert stored.method == "supervised" and stored.hyperparameters == {"n_epochs": 3}
        assert stored.metadata == {"guild": "42", "snapshot": "abc123"}
        purpose, content = fake.tuning.files[stored.training_file]
        assert purpose == "fine-tune" and content == (tmp_path / "train.jsonl").read_bytes()


async def test_a_preference_job_uses_the_dpo_method(tmp_path: Path) -> None:
    path = tmp_path / "dpo.jsonl"
    row = {
        "input": {"messages": [{"role": "user", "content": "Capital of Zorbia?"}]},
        "preferred_output": [{"role": "assistant", "content": "Quellport."}],
        "non_preferred_output": [{"role": "assistant", "content": "Paris."}],
    }
    path.write_text(json.dumps(row) + "\n")
    async with FakeOpenAI() as fake:
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=KEY, redact=Redactor([KEY]))
        job = await tuner.start(path, method="dpo")
        _, looks = await _until_done(tuner, job.job_id)
        await tuner.close()
    assert looks[-1].succeeded
    assert next(iter(fake.tuning.jobs.values())).method == "dpo"


async def test_a_file_the_provider_rejects_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    async with FakeOpenAI() as fake:
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=KEY, redact=Redactor([KEY]))
        job = await tuner.start(path)
        _, looks = await _until_done(tuner, job.job_id)
        await tuner.close()
    last = looks[-1]
    assert last.status == "failed" and not last.succeeded
    assert last.error == "Line 1 is missing messages for supervised."


async def test_a_failure_message_never_shows_a_secret(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        fake.tuning.fail_next_job(f"internal error while reading key {KEY}")
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=KEY, redact=Redactor([KEY]))
        job = await tuner.start(_sft_file(tmp_path))
        events, looks = await _until_done(tuner, job.job_id)
        await tuner.close()
    last = looks[-1]
    assert last.status == "failed"
    assert last.error is not None and "internal error while reading key" in last.error
    assert KEY not in last.error and all(KEY not in e for e in events)


async def test_cancel_stops_the_job_and_a_finished_job_is_left_alone(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=KEY, redact=Redactor([KEY]))
        job = await tuner.start(_sft_file(tmp_path))
        cancelled = await tuner.cancel(job.job_id)
        again = await tuner.cancel(job.job_id)  # already final: no error, same answer
        await tuner.close()
    assert cancelled.status == "cancelled" and cancelled.finished
    assert again.status == "cancelled"


async def test_a_base_that_cannot_be_fine_tuned_is_one_line(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        fake.tuning.refuse_models.add("gpt-4o-mini")
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=KEY, redact=Redactor([KEY]))
        with pytest.raises(RemoteRefused) as caught:
            await tuner.start(_sft_file(tmp_path))
        await tuner.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "The provider refused to start a fine-tuning job (400): "
        "Model gpt-4o-mini is not available for fine-tuning or does not exist."
    )
    assert not fake.tuning.jobs  # nothing was created


async def test_a_wrong_key_is_refused_without_repeating_it(tmp_path: Path) -> None:
    wrong = "sk-wrong-key-9876543210fedcba"
    async with FakeOpenAI(api_keys={KEY}) as fake:
        tuner = RemoteTuner.for_spec(_spec(fake), api_key=wrong, redact=Redactor([wrong]))
        with pytest.raises(RemoteRefused) as caught:
            await tuner.start(_sft_file(tmp_path))
        await tuner.close()
    assert "refused the API key" in str(caught.value)
    assert wrong not in str(caught.value) and wrong[-4:] not in str(caught.value)


def test_only_provider_models_with_a_key_are_tuned_remotely() -> None:
    local = ModelSpec(
        name="smollm2", provider="llama.cpp", model="smollm2", bundled="smollm2-135m-instruct"
    )
    with pytest.raises(RemoteRefused, match="tuned locally"):
        RemoteTuner.for_spec(local, api_key=KEY, redact=Redactor())
    remote = ModelSpec(name="mini", provider="openai", model="gpt-4o-mini")
    with pytest.raises(RemoteRefused, match="set OPENAI_API_KEY"):
        RemoteTuner.for_spec(remote, api_key="", redact=Redactor())
