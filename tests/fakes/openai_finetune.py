"""OpenAI's files and fine-tuning jobs endpoints, for `FakeOpenAI` (tests/fakes/openai_server.py).

The real `openai` client uploads a JSONL (`POST /files`, multipart, `purpose=fine-tune`),
creates a job (`POST /fine_tuning/jobs` with `method`), reads it (`GET .../{id}`), its events
(`GET .../{id}/events`) and cancels it (`POST .../{id}/cancel`). Served under `/v1` (OpenAI)
and `/openai` (Azure, which also wants `api-version`).

A job moves one phase per read, as a slow provider would look to a poller:
validating_files → queued → running (one step per read, each with a metrics event) →
succeeded with `ft:<base>:<org>:<suffix>:<id>`. The training file is checked the way OpenAI
checks it (JSONL, the keys of the chosen method); a bad file fails the job with
`invalid_training_file`. Knobs: `fail_next_job(message)`, `refuse_models`, `steps`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# The keys each method's training file needs on every line (OpenAI's published formats).
_REQUIRED_KEYS = {
    "supervised": {"messages"},
    "dpo": {"input", "preferred_output", "non_preferred_output"},
}
_PHASES = ("validating_files", "queued", "running")


@dataclass
class _Job:
    id: str
    model: str
    method: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: dict[str, str] | None
    hyperparameters: dict[str, Any]
    created_at: int
    status: str = "validating_files"
    step: int = 0
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    fail_with: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class FakeFineTuning:
    """The state of uploaded files and jobs, and the handlers that serve them."""

    def __init__(self, *, steps: int = 3, check_key: Any = None) -> None:
        self.steps = steps  # reads spent "running" before a job succeeds
        self.refuse_models: set[str] = set()  # bases answered with 400 model_not_available
        self.files: dict[str, tuple[str, bytes]] = {}  # id -> (purpose, content)
        self.jobs: dict[str, _Job] = {}
        self._check_key = check_key
        self._fail_next: list[str] = []
        self._lock = threading.Lock()  # knobs are set from the test's thread

    def fail_next_job(self, message: str) -> None:
        """The next job created fails while running, with this error message."""
        with self._lock:
            self._fail_next.append(message)

    def register(self, router: web.UrlDispatcher) -> None:
        for prefix in ("/v1", "/openai"):
            router.add_post(f"{prefix}/files", self._upload)
            router.add_post(f"{prefix}/fine_tuning/jobs", self._create)
            router.add_get(f"{prefix}/fine_tuning/jobs/{{job}}", self._retrieve)
            router.add_get(f"{prefix}/fine_tuning/jobs/{{job}}/events", self._events)
            router.add_post(f"{prefix}/fine_tuning/jobs/{{job}}/cancel", self._cancel)

    # -- handlers -----------------------------------------------------------------------------

    def _refused(self, request: web.Request) -> web.Response | None:
        if request.path.startswith("/openai/") and "api-version" not in request.query:
            return _error(404, "Resource not found (missing api-version).", "404")
        if self._check_key is not None:
            denied: web.Response | None = self._check_key(request)
            return denied
        return None

    async def _upload(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        form = await request.post()
        purpose = str(form.get("purpose", ""))
        upload = form.get("file")
        if purpose != "fine-tune" or not isinstance(upload, web.FileField):
            return _error(400, "A file and purpose 'fine-tune' are required.", None)
        content = upload.file.read()
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        with self._lock:
            self.files[file_id] = (purpose, content)
        return web.json_response(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": upload.filename,
                "purpose": purpose,
                "status": "processed",
            }
        )

    async def _create(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        model = str(body.get("model", ""))
        if model in self.refuse_models:
            return _error(
                400,
                f"Model {model} is not available for fine-tuning or does not exist.",
                "model_not_available",
            )
        training_file = str(body.get("training_file", ""))
        if training_file not in self.files:
            return _error(400, f"invalid training_file: {training_file}", None)
        method = body.get("method") or {"type": "supervised"}
        kind = str(method.get("type", "supervised"))
        if kind not in _REQUIRED_KEYS:
            return _error(400, f"Unsupported fine-tuning method: {kind}", None)
        hyper = dict((method.get(kind) or {}).get("hyperparameters") or {})
        now = int(time.time())
        with self._lock:
            job = _Job(
                id=f"ftjob-{uuid.uuid4().hex[:24]}",
                model=model,
                method=kind,
                training_file=training_file,
                validation_file=body.get("validation_file"),
                suffix=body.get("suffix"),
                metadata=body.get("metadata"),
                hyperparameters=hyper,
                created_at=now,
                fail_with=self._fail_next.pop(0) if self._fail_next else None,
            )
            self.jobs[job.id] = job
            self._event(job, "info", f"Created fine-tuning job: {job.id}")
        return web.json_response(_job_json(job))

    async def _retrieve(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        with self._lock:
            job = self.jobs.get(request.match_info["job"])
            if job is None:
                return _error(404, "Could not find fine-tuning job.", "fine_tune_not_found")
            self._advance(job)
            return web.json_response(_job_json(job))

    async def _events(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        with self._lock:
            job = self.jobs.get(request.match_info["job"])
            if job is None:
                return _error(404, "Could not find fine-tuning job.", "fine_tune_not_found")
            # Newest first, as OpenAI lists them; `after` is an event id (page backwards).
            newest_first = list(reversed(job.events))
            after = request.query.get("after")
            if after:
                ids = [e["id"] for e in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            limit = int(request.query.get("limit", "20"))
            page = newest_first[:limit]
            return web.json_response(
                {"object": "list", "data": page, "has_more": len(newest_first) > limit}
            )

    async def _cancel(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        with self._lock:
            job = self.jobs.get(request.match_info["job"])
            if job is None:
                return _error(404, "Could not find fine-tuning job.", "fine_tune_not_found")
            if job.status in ("succeeded", "failed", "cancelled"):
                return _error(400, f"Job has already {job.status}.", None)
            job.status = "cancelled"
            job.finished_at = int(time.time())
            self._event(job, "info", "Fine-tuning job cancelled")
            return web.json_response(_job_json(job))

    # -- the job's life -------------------------------------------------------------------------

    def _advance(self, job: _Job) -> None:
        if job.status in ("succeeded", "failed", "cancelled"):
            return
        if job.status == "validating_files":
            problem = self._check_file(job)
            if problem is not None:
                self._fail(job, "invalid_training_file", problem)
                return
            job.status = "queued"
            self._event(job, "info", "Validating training file: done")
            return
        if job.status == "queued":
            job.status = "running"
            self._event(job, "info", "Fine-tuning job started")
            return
        job.step += 1
        loss = round(2.0 / job.step, 4)
        self._event(
            job,
            "info",
            f"Step {job.step}/{self.steps}: training loss={loss}",
            data={"step": job.step, "total_steps": self.steps, "train_loss": loss},
            kind="metrics",
        )
        if job.fail_with is not None and job.step >= max(1, self.steps // 2):
            self._fail(job, "server_error", job.fail_with)
            return
        if job.step >= self.steps:
            job.status = "succeeded"
            job.finished_at = int(time.time())
            job.trained_tokens = 1000 * self.steps
            org = "fake-org"
            job.fine_tuned_model = f"ft:{job.model}:{org}:{job.suffix or 'custom'}:{job.id[-8:]}"
            self._event(job, "info", "The job has successfully completed")

    def _check_file(self, job: _Job) -> str | None:
        content = self.files[job.training_file][1]
        lines = [line for line in content.decode("utf-8", "replace").splitlines() if line.strip()]
        if not lines:
            return "The training file is empty."
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return f"Line {number} is not valid JSON."
            missing = _REQUIRED_KEYS[job.method] - set(row)
            if missing:
                return f"Line {number} is missing {', '.join(sorted(missing))} for {job.method}."
        return None

    def _fail(self, job: _Job, code: str, message: str) -> None:
        job.status = "failed"
        job.finished_at = int(time.time())
        job.error = {"code": code, "message": message, "param": None}
        self._event(job, "error", message)

    def _event(
        self,
        job: _Job,
        level: str,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        kind: str = "message",
    ) -> None:
        job.events.append(
            {
                "id": f"ftevent-{uuid.uuid4().hex[:20]}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data or {},
                "type": kind,
            }
        )


def _job_json(job: _Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": job.hyperparameters or {"n_epochs": "auto"},
        "model": job.model,
        "organization_id": "org-fake",
        "result_files": [],
        "seed": 42,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "metadata": job.metadata,
        "method": {"type": job.method},
    }


def _error(status: int, message: str, code: str | None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)
