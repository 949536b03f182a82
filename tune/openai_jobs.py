"""Fine-tuning jobs on OpenAI or Azure OpenAI: upload the dataset, start, poll, cancel.

    tuner = RemoteTuner.for_spec(base_spec, api_key=key, redact=redact)
    job = await tuner.start(Path("train.jsonl"), method="sft", suffix="support", metadata={...})
    while not (job := await tuner.poll(job.job_id, job.last_event)).finished:
        await asyncio.sleep(30)
    job.fine_tuned_model   # "ft:gpt-4o-mini-2024-07-18:org:support:abc123" once it succeeded

Every call is one short request (the job runs at the provider), so the bot polls from a
background task without ever waiting on training. The files it uploads are those of
`switchboard export --format openai-chat` (supervised) or `openai-dpo` (preference). A
refusal from the API (a base that cannot be fine-tuned, a bad key, a rejected file) is a
`RemoteRefused` with the provider's message, scrubbed of every secret the process knows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from chains.registry import ModelSpec
from tune.dataset import Method
from tune.errors import TuneError

# OpenAI's job statuses; the last three are final.
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_METHOD_TYPES: dict[Method, str] = {"sft": "supervised", "dpo": "dpo"}
_EVENT_PAGE = 100


class RemoteRefused(TuneError):
    """The provider refused a fine-tuning request; the message is its own, scrubbed."""


class RemoteUnreachable(TuneError):
    """The provider could not be reached; the job (if any) is still there: poll again later."""


@dataclass(frozen=True)
class RemoteJob:
    """One look at a provider's fine-tuning job."""

    job_id: str
    status: str  # validating_files | queued | running | succeeded | failed | cancelled
    base_model: str
    fine_tuned_model: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None  # Unix time, when the provider gives one
    error: str | None = None  # scrubbed
    events: tuple[str, ...] = ()  # messages new since the last poll, oldest first
    last_event: str | None = None  # pass back to `poll` to get only newer events

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded" and self.fine_tuned_model is not None


class RemoteTuner:
    """OpenAI's fine-tuning API for one base model, through the official `openai` client."""

    def __init__(
        self, client: openai.AsyncOpenAI, base_model: str, redact: Callable[[str], str]
    ) -> None:
        self.client = client
        self.base_model = base_model
        self.redact = redact

    @classmethod
    def for_spec(
        cls,
        spec: ModelSpec,
        *,
        api_key: str,
        redact: Callable[[str], str],
        timeout: float = 60.0,
    ) -> RemoteTuner:
        """A tuner for an `openai` or `azure-openai` registry entry (its base URL and key)."""
        if spec.provider not in ("openai", "azure-openai"):
            raise RemoteRefused(
                f"{spec.name} is a {spec.provider} model: only openai and azure-openai models "
                "are fine-tuned by their provider (a llama.cpp model is tuned locally)."
            )
        if not api_key:
            raise RemoteRefused(
                f"No API key for {spec.name}: set {spec.api_key_env or 'its api_key_env'} "
                "to fine-tune it."
            )
        client: openai.AsyncOpenAI
        if spec.provider == "azure-openai":
            # Azure fine-tunes the base model's name (not a deployment) under /openai.
            client = openai.AsyncAzureOpenAI(
                azure_endpoint=spec.base_url or "",
                api_version=spec.api_version,
                api_key=api_key,
                timeout=timeout,
                max_retries=2,
            )
        else:
            client = openai.AsyncOpenAI(
                base_url=spec.base_url, api_key=api_key, timeout=timeout, max_retries=2
            )
        return cls(client, spec.model, redact)

    async def close(self) -> None:
        await self.client.close()

    async def start(
        self,
        training_file: Path,
        *,
        method: Method = "sft",
        validation_file: Path | None = None,
        suffix: str | None = None,
        epochs: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> RemoteJob:
        """Upload the file(s) (`purpose="fine-tune"`) and create the job."""
        hyper: dict[str, Any] = {}
        if epochs is not None:
            hyper["n_epochs"] = epochs
        kind = _METHOD_TYPES[method]
        method_param: dict[str, Any] = {"type": kind, kind: {"hyperparameters": hyper}}
        async with self._talking("start a fine-tuning job"):
            train = await self._upload(training_file)
            valid = await self._upload(validation_file) if validation_file else None
            options: dict[str, Any] = {}
            if valid is not None:
                options["validation_file"] = valid
            if suffix:
                options["suffix"] = suffix[:64]  # OpenAI's limit
            if metadata:
                # OpenAI: at most 16 pairs, keys 64 and values 512 characters.
                options["metadata"] = {
                    str(k)[:64]: str(v)[:512] for k, v in list(metadata.items())[:16]
                }
            job = await self.client.fine_tuning.jobs.create(
                model=self.base_model,
                training_file=train,
                method=method_param,  # type: ignore[arg-type]  # a TypedDict the dict matches
                **options,
            )
        return self._look(job, [])

    async def poll(self, job_id: str, after_event: str | None = None) -> RemoteJob:
        """The job's status, its newest loss and step, and the events since `after_event`."""
        async with self._talking("read the fine-tuning job"):
            job = await self.client.fine_tuning.jobs.retrieve(job_id)
            events = await self._events(job_id, after_event)
        return self._look(job, events, after_event)

    async def cancel(self, job_id: str) -> RemoteJob:
        """Ask the provider to stop the job (a finished job is returned as it is)."""
        async with self._talking("cancel the fine-tuning job"):
            current = await self.client.fine_tuning.jobs.retrieve(job_id)
            if current.status in FINAL_STATUSES:
                return self._look(current, [])
            job = await self.client.fine_tuning.jobs.cancel(job_id)
        return self._look(job, [])

    # -- internals ----------------------------------------------------------------------------

    async def _upload(self, path: Path) -> str:
        try:
            # A snapshot can be tens of MB: read it off the event loop.
            content = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise TuneError(f"Cannot read {path}: {exc.strerror or exc}") from None
        uploaded = await self.client.files.create(file=(path.name, content), purpose="fine-tune")
        return uploaded.id

    async def _events(self, job_id: str, after_event: str | None) -> list[Any]:
        """Events newer than `after_event`, oldest first (the API lists newest first)."""
        page = await self.client.fine_tuning.jobs.list_events(job_id, limit=_EVENT_PAGE)
        newer: list[Any] = []
        for event in page.data:
            if event.id == after_event:
                break
            newer.append(event)
        newer.reverse()
        return newer

    def _look(self, job: Any, events: list[Any], after_event: str | None = None) -> RemoteJob:
        step = total = None
        loss = None
        for event in events:
            data = event.data if isinstance(event.data, dict) else {}
            if "step" in data:
                step = int(data["step"])
                total = int(data["total_steps"]) if data.get("total_steps") else total
            if data.get("train_loss") is not None:
                loss = float(data["train_loss"])
        error = None
        if job.error is not None and (job.error.message or job.error.code):
            error = self.redact(str(job.error.message or job.error.code))
        return RemoteJob(
            job_id=job.id,
            status=str(job.status),
            base_model=str(job.model),
            fine_tuned_model=job.fine_tuned_model,
            step=step,
            total_steps=total,
            loss=loss,
            trained_tokens=job.trained_tokens,
            estimated_finish=getattr(job, "estimated_finish", None),
            error=error,
            events=tuple(self.redact(str(e.message)) for e in events),
            last_event=events[-1].id if events else after_event,
        )

    def _talking(self, doing: str) -> _Talking:
        return _Talking(doing, self.redact)


class _Talking:
    """Turns the `openai` client's exceptions into one scrubbed line."""

    def __init__(self, doing: str, redact: Callable[[str], str]) -> None:
        self.doing = doing
        self.redact = redact

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, openai.APIConnectionError):
            raise RemoteUnreachable(
                f"Could not reach the provider to {self.doing}: {self.redact(str(exc))}"
            ) from None
        if isinstance(exc, openai.AuthenticationError):
            raise RemoteRefused(
                f"The provider refused the API key while trying to {self.doing}: check the key."
            ) from None
        if isinstance(exc, openai.APIStatusError):
            message = _api_message(exc)
            raise RemoteRefused(
                f"The provider refused to {self.doing} ({exc.status_code}): {self.redact(message)}"
            ) from None


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return exc.message
