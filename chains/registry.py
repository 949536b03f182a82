"""The model registry: models from a TOML file, plus models registered at run time.

    default_model = "gpt-4o-mini"
    comparison_models = ["llama3"]   # compared with a place's own model by default
    arena_pool = ["gpt-4o-mini", "llama3", "smollm2"]   # what blind battles draw from
    [models.gpt-4o-mini]
    provider = "openai"              # openai | azure-openai | openai-compatible | llama.cpp
    model = "gpt-4o-mini"            # the provider's model id (defaults to the entry's name)
    api_key_env = "OPENAI_API_KEY"   # the NAME of the variable holding the key
    fallback = "smollm2"             # answers when this one fails

Keys never live in the file, only the names of the variables that hold them. Every
problem is reported as a `ConfigError` naming the file and the model.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError, NotFound
from core.redact import public_url

Provider = Literal["openai", "azure-openai", "openai-compatible", "llama.cpp"]
Origin = Literal["config", "database", "builtin"]

PROVIDERS: tuple[str, ...] = ("openai", "azure-openai", "openai-compatible", "llama.cpp")
BUNDLED_MODELS: tuple[str, ...] = ("smollm2-135m-instruct",)
DEFAULT_CONTEXT_WINDOW = 8192
# Where each hosted provider's key usually lives, when the entry names no variable.
DEFAULT_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "azure-openai": "AZURE_OPENAI_API_KEY",
}
TOP_LEVEL_KEYS: frozenset[str] = frozenset(
    {"default_model", "models", "comparison_models", "arena_pool"}
)
# A comparison asks at most this many models; the place's own model joins comparison_models.
MAX_COMPARED = 4
# Keys people write when they paste a secret into the file; refused without echoing the value.
_SECRET_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "openai_api_key",
        "azure_api_key",
        "secret",
        "token",
        "password",
        "api_token",
    }
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$")


class Lineage(BaseModel):
    """Where a registered model came from: what it was made from, how, from which data, by whom."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str | None = None  # the registry name of the model it was made from
    source: str | None = None  # how it was made: "gguf-file", "openai-fine-tune", "lora", ...
    dataset_hash: str | None = None  # the hash of the dataset snapshot it was trained on
    created_by: str | None = None  # who registered it ("cli", a Discord user id, a job id)


class ModelSpec(BaseModel):
    """One model the bot can talk to, and what it costs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    provider: Provider
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    api_version: str | None = None
    deployment: str | None = None
    fallback: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    context_window: int = Field(default=DEFAULT_CONTEXT_WINDOW, gt=0)
    input_price: float = Field(default=0.0, ge=0)
    output_price: float = Field(default=0.0, ge=0)
    # USD per million training tokens, where the provider fine-tunes this model: the
    # estimated cost `switchboard export` prints.
    training_price: float | None = Field(default=None, ge=0)
    open_weights: bool = False
    description: str = ""
    path: str | None = None
    bundled: str | None = None
    lora: str | None = None  # a GGUF LoRA adapter applied to the base in `path` or `bundled`
    context_size: int | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, gt=0)
    parallel: int | None = Field(default=None, gt=0)
    lineage: Lineage | None = None
    # A fine-tune not yet promoted: admins may choose it (and /compare and /arena offer
    # it), members may not, until `switchboard tune promote` clears this.
    candidate: bool = False
    origin: Origin = "config"

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill the defaults that depend on the provider."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        provider = data.get("provider")
        if "model" not in data and "name" in data:
            data["model"] = data["name"]
        if "open_weights" not in data:
            data["open_weights"] = provider in ("llama.cpp", "openai-compatible")
        if "context_window" not in data:
            local = provider == "llama.cpp" and data.get("context_size")
            data["context_window"] = local or DEFAULT_CONTEXT_WINDOW
        if not data.get("api_key_env") and provider in DEFAULT_KEY_ENV:
            data["api_key_env"] = DEFAULT_KEY_ENV[provider]
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        """Refuse entries that cannot work."""
        if not _MODEL_NAME.match(self.name):
            raise ValueError(
                "model names are 1-64 letters, digits and . _ : / @ + - (no spaces), starting with a letter or digit"
            )
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            # Someone pasted the key itself here: do not repeat it.
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), not the key itself"
            )
        if self.provider == "openai-compatible" and not self.base_url:
            raise ValueError(
                'provider "openai-compatible" needs base_url (e.g. "http://localhost:11434/v1")'
            )
        if self.provider == "azure-openai":
            missing = [k for k in ("base_url", "api_version") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f'provider "azure-openai" needs {" and ".join(missing)} '
                    '(base_url is the resource endpoint, e.g. "https://NAME.openai.azure.com")'
                )
        if self.provider == "llama.cpp":
            if not self.path and not self.bundled:
                raise ValueError(
                    'provider "llama.cpp" needs path (a .gguf file) or bundled = "smollm2-135m-instruct"'
                )
            if self.path and self.bundled:
                raise ValueError('provider "llama.cpp" takes path or bundled, not both')
            if self.lora is not None and not self.lora.strip():
                raise ValueError("lora must be the path of a GGUF LoRA adapter file")
            if self.bundled and self.bundled not in BUNDLED_MODELS:
                raise ValueError(
                    f"unknown bundled model {self.bundled!r} (available: {', '.join(BUNDLED_MODELS)})"
                )
        elif self.lora:
            raise ValueError('lora (a GGUF LoRA adapter) only works with provider "llama.cpp"')
        if self.fallback == self.name:
            raise ValueError("a model cannot be its own fallback")
        return self

    @property
    def is_local(self) -> bool:
        """Whether Switchboard runs this model itself (llama.cpp)."""
        return self.provider == "llama.cpp"

    @property
    def azure_deployment(self) -> str:
        """The Azure deployment name (defaults to the model id)."""
        return self.deployment or self.model

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price in USD of one exchange with this many tokens."""
        return (
            prompt_tokens * self.input_price + completion_tokens * self.output_price
        ) / 1_000_000

    @property
    def public_base_url(self) -> str | None:
        """The base_url as it may be shown: a password, token or secret query value in it masked."""
        return public_url(self.base_url) if self.base_url else None

    def to_public_dict(self) -> dict[str, Any]:
        """Everything about the model that may be shown: variable names, never keys, and the base_url masked."""
        public = self.model_dump(mode="json")
        public["base_url"] = self.public_base_url
        return public


class ModelRegistry:
    """The models the bot knows: from the config file, built in, or registered at run time."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        default_model: str,
        source: str = "<built-in>",
        *,
        comparison_models: Sequence[str] = (),
        arena_pool: Sequence[str] = (),
    ) -> None:
        self.source = source
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ConfigError(f"{source}: model '{spec.name}' is defined twice.")
            self._specs[spec.name] = spec
        if default_model not in self._specs:
            raise ConfigError(
                f"{source}: default_model '{default_model}' is not a defined model."
                f"{_suggest(default_model, self._specs)} Defined: {', '.join(self._specs) or 'none'}."
            )
        self.default_model = default_model
        self._check_fallbacks(self._specs.values())
        # Compared with a place's own model when no models are named (at most 3 of them).
        self.comparison_models: tuple[str, ...] = self._model_list(
            "comparison_models", comparison_models, most=MAX_COMPARED - 1
        )
        # What blind battles draw from where no place sets a pool (empty: every model).
        self.arena_pool: tuple[str, ...] = self._model_list("arena_pool", arena_pool, least=2)

    def _model_list(
        self, key: str, names: Sequence[str], *, least: int = 0, most: int | None = None
    ) -> tuple[str, ...]:
        """A top-level list of model names, checked: defined models, each once, how many."""
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise ConfigError(
                f'{self.source}: {key} must be a list of model names, e.g. {key} = ["a", "b"].'
            )
        for name in names:
            if name not in self._specs:
                raise ConfigError(
                    f"{self.source}: {key}: '{name}' is not a defined model."
                    f"{_suggest(name, self._specs)} Defined: {', '.join(self._specs)}."
                )
        twice = sorted({name for name in names if list(names).count(name) > 1})
        if twice:
            raise ConfigError(f"{self.source}: {key} names {', '.join(twice)} more than once.")
        if names and len(names) < least:
            raise ConfigError(
                f"{self.source}: {key} needs at least {least} models (a battle draws two)."
            )
        if most is not None and len(names) > most:
            raise ConfigError(
                f"{self.source}: {key} lists {len(names)} models; at most {most}, because a "
                f"place's own model joins them and a comparison asks {MAX_COMPARED} at most."
            )
        return tuple(names)

    @classmethod
    def builtin(cls) -> ModelRegistry:
        """The registry used without a config file: the bundled SmolLM2, served locally."""
        spec = ModelSpec(
            name="smollm2",
            provider="llama.cpp",
            model="smollm2-135m-instruct",
            bundled="smollm2-135m-instruct",
            context_window=8192,
            description="SmolLM2-135M-Instruct, bundled and run locally with llama.cpp: tiny, free, offline.",
            origin="builtin",
        )
        return cls([spec], default_model="smollm2", source="<built-in>")

    @classmethod
    def from_toml(cls, path: Path, *, required: bool = False) -> ModelRegistry:
        """Load the registry from a TOML file.

        A missing file means the built-in registry, unless the file was asked for by name
        (`required`: SWITCHBOARD_CONFIG set): then it is an error naming the path, not a
        silent switch to the bundled model.
        """
        path = Path(path)
        if not path.exists():
            if required:
                raise ConfigError(
                    f"{path}: no such file (SWITCHBOARD_CONFIG names it). Create it (see "
                    "switchboard.example.toml) or unset SWITCHBOARD_CONFIG to use the bundled model."
                )
            return cls.builtin()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: cannot read the file ({exc.__class__.__name__}: {exc})."
            ) from None
        return cls.from_dict(data, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = "<config>", base_dir: Path | None = None
    ) -> ModelRegistry:
        """Build the registry from parsed TOML; relative GGUF paths are taken relative to `base_dir`."""
        unknown = sorted(set(data) - TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown top-level key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} (expected {', '.join(sorted(TOP_LEVEL_KEYS))})."
            )
        models = data.get("models")
        if not isinstance(models, dict) or not models:
            raise ConfigError(f"{source}: no models defined; add at least one [models.NAME] table.")
        specs: list[ModelSpec] = []
        for name, entry in models.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: models.{name} must be a table ([models.{name}]).")
            specs.append(_parse_entry(name, entry, source, base_dir))
        default = data.get("default_model")
        if default is None:
            default = specs[0].name
        if not isinstance(default, str):
            raise ConfigError(f"{source}: default_model must be a model name in quotes.")
        return cls(
            specs,
            default_model=default,
            source=source,
            comparison_models=data.get("comparison_models", ()),
            arena_pool=data.get("arena_pool", ()),
        )

    # -- lookups ------------------------------------------------------------------------------

    @property
    def default(self) -> ModelSpec:
        return self._specs[self.default_model]

    def get(self, name: str) -> ModelSpec:
        """The model called `name`, or NotFound with the closest names."""
        try:
            return self._specs[name]
        except KeyError:
            raise NotFound(
                f"No model named '{name}'.{_suggest(name, self._specs)}", listing="model list"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def all(self) -> list[ModelSpec]:
        """Every model, in definition order."""
        return list(self._specs.values())

    def names(self) -> list[str]:
        """Every model's name, in definition order."""
        return list(self._specs)

    def fallback_chain(self, name: str) -> list[ModelSpec]:
        """The model, then its fallback, then that one's, and so on (never repeating)."""
        chain = [self.get(name)]
        seen = {name}
        while (
            chain[-1].fallback
            and chain[-1].fallback not in seen
            and chain[-1].fallback in self._specs
        ):
            seen.add(chain[-1].fallback)
            chain.append(self._specs[chain[-1].fallback])
        return chain

    # -- run-time models ----------------------------------------------------------------------

    def add(self, spec: ModelSpec) -> ModelSpec:
        """Register a run-time model (origin "database"); config and built-in models cannot be replaced."""
        existing = self._specs.get(spec.name)
        if existing is not None and existing.origin != "database":
            raise ConfigError(
                f"Model '{spec.name}' is already defined in {self.source}; register the new model under another name."
            )
        if spec.origin != "database":
            spec = spec.model_copy(update={"origin": "database"})
        if spec.fallback and spec.fallback not in self._specs:
            raise ConfigError(
                f"Model '{spec.name}': its fallback '{spec.fallback}' is not a known model."
                f"{_suggest(spec.fallback, self._specs)}"
            )
        candidate = {**self._specs, spec.name: spec}
        self._check_fallbacks(candidate.values(), specs=candidate)
        self._specs[spec.name] = spec
        return spec

    def remove(self, name: str) -> None:
        """Forget a run-time model; config and built-in models stay."""
        spec = self.get(name)
        if spec.origin != "database":
            raise ConfigError(
                f"Model '{name}' is defined in {self.source}; remove it from that file instead."
            )
        if name == self.default_model:
            raise ConfigError(f"Model '{name}' is the default model and cannot be removed.")
        users = [s.name for s in self._specs.values() if s.fallback == name]
        if users:
            raise ConfigError(
                f"Model '{name}' is the fallback of {', '.join(users)}; change those first."
            )
        del self._specs[name]

    def sync_registered(self, specs: Iterable[ModelSpec]) -> dict[str, str]:
        """Make the run-time models exactly `specs` (another process may have added or removed some).

        Config and built-in models stay as they are (they never fall back to run-time ones).
        A run-time model that cannot be used here (its name is taken by the config, or its
        fallback is unknown) is left out; returns {name: why} for those. Fallbacks that go
        round in a circle change nothing and name every model given.
        """
        kept = {name: spec for name, spec in self._specs.items() if spec.origin != "database"}
        skipped: dict[str, str] = {}
        wanted = {spec.name: spec for spec in specs}
        for name, spec in wanted.items():
            if name in kept:
                skipped[name] = f"the name is taken by a model in {self.source}"
                continue
            if spec.origin != "database":
                spec = spec.model_copy(update={"origin": "database"})
            kept[name] = spec
        # Drop entries whose fallback is gone, until every chain ends in a known model.
        changed = True
        while changed:
            changed = False
            for name, spec in list(kept.items()):
                if spec.origin == "database" and spec.fallback and spec.fallback not in kept:
                    skipped[name] = f"its fallback '{spec.fallback}' is not a known model"
                    del kept[name]
                    changed = True
        try:
            self._check_fallbacks(kept.values(), specs=kept)
        except ConfigError as exc:
            return {name: str(exc) for name in wanted}
        self._specs = kept
        return skipped

    def _check_fallbacks(
        self, entries: Iterable[ModelSpec], specs: dict[str, ModelSpec] | None = None
    ) -> None:
        """Every fallback names a known model, and no chain loops."""
        specs = self._specs if specs is None else specs
        for spec in entries:
            if spec.fallback is None:
                continue
            if spec.fallback not in specs:
                raise ConfigError(
                    f"{self.source}: model '{spec.name}': fallback '{spec.fallback}' is not a defined model."
                    f"{_suggest(spec.fallback, specs)}"
                )
            path = [spec.name]
            current: ModelSpec | None = spec
            while current is not None and current.fallback is not None:
                if current.fallback in path:
                    loop = " -> ".join([*path[path.index(current.fallback) :], current.fallback])
                    raise ConfigError(
                        f"{self.source}: model '{spec.name}': fallbacks go round in a circle ({loop})."
                    )
                path.append(current.fallback)
                current = specs.get(current.fallback)


def _parse_entry(name: str, entry: dict[str, Any], source: str, base_dir: Path | None) -> ModelSpec:
    """One [models.NAME] table → ModelSpec, or a ConfigError naming the file and the model."""
    where = f"{source}: model '{name}'"
    secrets_found = sorted(k for k in entry if k.lower() in _SECRET_KEYS)
    if secrets_found:
        raise ConfigError(
            f"{where}: '{secrets_found[0]}' looks like an API key written into the file. Keys never go in the "
            "config: put the key in an environment variable and name that variable with "
            'api_key_env = "OPENAI_API_KEY" (or any name you like).'
        )
    for forbidden in ("name", "origin"):
        if forbidden in entry:
            raise ConfigError(
                f"{where}: '{forbidden}' cannot be set in the file (the table's name is the model's name)."
            )
    data = {**entry, "name": name, "origin": "config"}
    for key in ("path", "lora"):
        if base_dir is not None and isinstance(data.get(key), str) and data[key].strip():
            gguf = Path(data[key]).expanduser()
            data[key] = str(gguf if gguf.is_absolute() else (base_dir / gguf).resolve())
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_explain(exc)}") from None


def _explain(exc: ValidationError) -> str:
    """Pydantic's errors as one short sentence a person can act on."""
    problems: list[str] = []
    fields = [f for f in ModelSpec.model_fields if f not in ("name", "origin")]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(key, fields, n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            )
            problems.append(f"unknown key '{key}'{hint}")
        elif kind == "missing":
            problems.append(f"'{key}' is required")
        elif kind == "literal_error" and key == "provider":
            problems.append(
                f"unknown provider {error['input']!r} (choose one of {', '.join(PROVIDERS)})"
            )
        elif kind == "value_error":
            problems.append(str(error["msg"]).removeprefix("Value error, "))
        else:
            problems.append(f"'{key}': {error['msg'].lower()} (got {error['input']!r})")
    return "; ".join(problems) + "."


def _suggest(name: str, names: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest name, or ''."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""
