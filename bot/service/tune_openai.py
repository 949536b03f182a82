"""The OpenAI fine-tuning backend: jobs run at OpenAI (or Azure OpenAI), Switchboard polls them.

`start` uploads the job's snapshot (the export's `openai-chat` or `openai-dpo` file) and
creates the job with the `method` parameter and metadata naming the server, the job and
the snapshot's hash; `poll` reads its status and new events (a short request every
`poll_interval_s`, never a wait on training); success registers the provider's `ft:…`
model as a candidate. A provider's job outlives the process that started it
(`resumable`): after a restart the bot picks up the polling (`resume`). A base can be
fine-tuned when the configuration says its provider trains it: `training_price` (USD
per million training tokens) is set for it.

On Azure the fine-tuned model answers through a deployment: the candidate is registered
with the deployment named like the model (create it in Azure AI Foundry, see README).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

from bot.service.tune import BackendPoll, JobTicket
from chains.registry import Lineage, ModelSpec
from core.errors import UserError
from tune.openai_jobs import RemoteJob, RemoteTuner, RemoteUnreachable

# The export format each method's snapshot is written in for this backend.
EXPORT_FORMATS = {"sft": "openai-chat", "dpo": "openai-dpo"}
_WAITING = {"validating_files": "validating", "queued": "queued", "running": "training"}


@dataclass
class _Remote:
    """A provider job this process follows."""

    tuner: RemoteTuner
    ticket: JobTicket
    base: ModelSpec
    job_id: str
    last_event: str | None = None
    last: BackendPoll | None = None


class OpenAIBackend:
    """Fine-tuning through OpenAI's (or Azure OpenAI's) jobs API."""

    kind = "openai"
    resumable = True
    export_formats = EXPORT_FORMATS

    def __init__(
        self,
        secret: Callable[[str], SecretStr | None],
        redact: Callable[[str], str],
        *,
        poll_interval_s: float = 30.0,
    ) -> None:
        self.secret = secret
        self.redact = redact
        self.poll_interval_s = poll_interval_s
        self._jobs: dict[str, _Remote] = {}

    def check(self, base: ModelSpec, method: str) -> None:
        """Refuse, in one line, a base its provider does not fine-tune here or without a key."""
        if base.provider not in ("openai", "azure-openai"):
            raise UserError(f"`{base.name}` is not an OpenAI model ({base.provider}).")
        if base.candidate or (base.lineage and base.lineage.source == "openai-fine-tune"):
            raise UserError(
                f"`{base.name}` is itself a fine-tune; fine-tune its base "
                f"`{base.lineage.base_model if base.lineage else '?'}` instead."
            )
        if base.training_price is None:
            raise UserError(
                f"`{base.name}` is not marked as fine-tunable: if {base.provider} fine-tunes "
                f"`{base.model}`, give it a training_price (USD per million training tokens) "
                "in the config."
            )
        if method not in EXPORT_FORMATS:
            raise UserError(f"Unknown method {method!r}: use sft or dpo.")
        if not self._key(base):
            raise UserError(
                f"No API key for `{base.name}`: set {base.api_key_env} to fine-tune it."
            )

    async def start(self, ticket: JobTicket, base: ModelSpec) -> str:
        """Upload the snapshot and create the job; the provider's job id."""
        tuner = RemoteTuner.for_spec(base, api_key=self._key(base), redact=self.redact)
        try:
            job = await tuner.start(
                ticket.dataset,
                method=ticket.method,
                suffix=_suffix(ticket.name),
                epochs=round(ticket.epochs) if ticket.epochs else None,
                metadata={
                    "switchboard_job": ticket.job_id,
                    "guild": str(ticket.guild_id or "global"),
                    "snapshot_sha256": ticket.dataset_sha256,
                    "rows": str(ticket.rows),
                },
            )
        except BaseException:
            await tuner.close()
            raise
        self._jobs[job.job_id] = _Remote(tuner, ticket, base, job.job_id)
        return job.job_id

    def resume(self, ticket: JobTicket, base: ModelSpec, external_id: str) -> None:
        """Follow a job another (now stopped) process started."""
        if external_id not in self._jobs:
            tuner = RemoteTuner.for_spec(base, api_key=self._key(base), redact=self.redact)
            self._jobs[external_id] = _Remote(tuner, ticket, base, external_id)

    async def poll(self, external_id: str) -> BackendPoll:
        """The job's status, step and loss; once it succeeded, the model to register."""
        remote = self._jobs.get(external_id)
        if remote is None:
            return BackendPoll(
                phase="failed", done=True, error="this process does not follow that job"
            )
        try:
            job = await remote.tuner.poll(remote.job_id, remote.last_event)
        except RemoteUnreachable:
            # The job is still running at the provider: try again at the next poll.
            return remote.last or BackendPoll(phase="unreachable")
        except UserError as exc:
            await self._forget(external_id)
            return BackendPoll(phase="failed", done=True, error=str(exc))
        remote.last_event = job.last_event
        poll = self._translate(remote, job)
        remote.last = poll
        if poll.done:
            await self._forget(external_id)
        return poll

    async def cancel(self, external_id: str) -> None:
        """Ask the provider to cancel the job (a finished one is left as it is)."""
        remote = self._jobs.get(external_id)
        if remote is None:
            return
        try:
            await remote.tuner.cancel(remote.job_id)
        finally:
            await self._forget(external_id)

    async def aclose(self) -> None:
        for external_id in list(self._jobs):
            await self._forget(external_id)

    # -- internals ----------------------------------------------------------------------------

    def _key(self, base: ModelSpec) -> str:
        secret = self.secret(base.api_key_env) if base.api_key_env else None
        return secret.get_secret_value() if secret else ""

    async def _forget(self, external_id: str) -> None:
        remote = self._jobs.pop(external_id, None)
        if remote is not None:
            await remote.tuner.close()

    def _translate(self, remote: _Remote, job: RemoteJob) -> BackendPoll:
        previous = remote.last
        step = job.step if job.step is not None else (previous.step if previous else 0)
        total = job.total_steps or (previous.total if previous else None)
        loss = job.loss if job.loss is not None else (previous.loss if previous else None)
        eta = max(0.0, job.estimated_finish - time.time()) if job.estimated_finish else None
        if job.status == "cancelled":
            return BackendPoll(phase="cancelled", step=step, total=total, done=True, cancelled=True)
        if job.status == "failed":
            return BackendPoll(
                phase="failed",
                step=step,
                total=total,
                loss=loss,
                done=True,
                error=f"{remote.base.provider} job {job.job_id} failed: {job.error or 'no reason given'}",
            )
        if job.succeeded and job.fine_tuned_model:
            return BackendPoll(
                phase="trained",
                step=step,
                total=total,
                loss=loss,
                done=True,
                spec=self._spec(remote, job.fine_tuned_model),
            )
        return BackendPoll(
            phase=_WAITING.get(job.status, job.status), step=step, total=total, loss=loss, eta_s=eta
        )

    def _spec(self, remote: _Remote, model: str) -> ModelSpec:
        base, ticket = remote.base, remote.ticket
        return base.model_copy(
            update={
                "name": ticket.name,
                "model": model,
                # Azure serves a fine-tune through a deployment the admin creates: named like it.
                "deployment": ticket.name if base.provider == "azure-openai" else None,
                "training_price": None,
                "fallback": None,
                "description": f"{base.name} fine-tuned at {base.provider} on {ticket.rows} "
                f"logged examples ({ticket.method}, job {remote.job_id}).",
                "lineage": Lineage(
                    base_model=base.name,
                    source="openai-fine-tune",
                    dataset_hash=ticket.dataset_sha256,
                    created_by=f"tune job {ticket.job_id}",
                ),
                "origin": "runtime",
            }
        )


def _suffix(name: str) -> str:
    """OpenAI's suffix for the `ft:` name: letters, digits and dashes."""
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)[:64]
