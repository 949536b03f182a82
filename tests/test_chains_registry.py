"""The model registry: parsing the TOML file and every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from chains.registry import ModelRegistry, ModelSpec
from core.errors import ConfigError, NotFound

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
default_model = "gpt-4o-mini"

[models.gpt-4o-mini]
provider = "openai"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
fallback = "llama3"
input_price = 0.15
output_price = 0.60
context_window = 128000
description = "small"

[models.llama3]
provider = "openai-compatible"
model = "llama3.1"
base_url = "http://localhost:11434/v1"
fallback = "smollm2"

[models.azure]
provider = "azure-openai"
model = "gpt-4o"
base_url = "https://x.openai.azure.com"
api_version = "2024-10-21"

[models.smollm2]
provider = "llama.cpp"
bundled = "smollm2-135m-instruct"
context_size = 4096
threads = 2
parallel = 4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "switchboard.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> ModelRegistry:
    return ModelRegistry.from_toml(write(tmp_path, text))


def test_parses_every_provider_with_defaults(tmp_path: Path) -> None:
    registry = load(tmp_path, GOOD)
    assert registry.default_model == "gpt-4o-mini"
    assert registry.names() == ["gpt-4o-mini", "llama3", "azure", "smollm2"]
    gpt = registry.get("gpt-4o-mini")
    assert (gpt.provider, gpt.model, gpt.context_window, gpt.open_weights, gpt.origin) == (
        "openai",
        "gpt-4o-mini",
        128000,
        False,
        "config",
    )
    llama = registry.get("llama3")
    assert llama.open_weights is True and llama.context_window == 8192 and llama.api_key_env is None
    azure = registry.get("azure")
    assert azure.api_key_env == "AZURE_OPENAI_API_KEY" and azure.azure_deployment == "gpt-4o"
    local = registry.get("smollm2")
    assert local.is_local and local.context_window == 4096 and local.open_weights
    assert local.model == "smollm2"  # defaults to the entry's name
    assert [s.name for s in registry.all()] == registry.names()
    assert registry.default is gpt


def test_cost_and_public_dict(tmp_path: Path) -> None:
    gpt = load(tmp_path, GOOD).get("gpt-4o-mini")
    assert gpt.cost(1_000_000, 0) == pytest.approx(0.15)
    assert gpt.cost(2000, 1000) == pytest.approx((2000 * 0.15 + 1000 * 0.60) / 1e6)
    public = gpt.to_public_dict()
    assert public["api_key_env"] == "OPENAI_API_KEY" and public["input_price"] == 0.15
    assert public["name"] == "gpt-4o-mini"


def test_fallback_chain(tmp_path: Path) -> None:
    registry = load(tmp_path, GOOD)
    assert [s.name for s in registry.fallback_chain("gpt-4o-mini")] == [
        "gpt-4o-mini",
        "llama3",
        "smollm2",
    ]
    assert [s.name for s in registry.fallback_chain("smollm2")] == ["smollm2"]


def test_missing_file_gives_the_builtin_local_model(tmp_path: Path) -> None:
    registry = ModelRegistry.from_toml(tmp_path / "nope.toml")
    assert registry.default_model == "smollm2"
    spec = registry.get("smollm2")
    assert spec.provider == "llama.cpp" and spec.bundled == "smollm2-135m-instruct"
    assert spec.origin == "builtin" and spec.open_weights and spec.cost(10**6, 10**6) == 0
    assert spec.context_window == 8192 and spec.description


def test_a_missing_file_that_was_asked_for_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ModelRegistry.from_toml(tmp_path / "nope.toml", required=True)
    assert str(tmp_path / "nope.toml") in caught.value.message
    assert "SWITCHBOARD_CONFIG" in caught.value.message


def test_example_file_loads() -> None:
    registry = ModelRegistry.from_toml(ROOT / "switchboard.example.toml")
    assert registry.default_model == "gpt-4o-mini"
    assert [s.name for s in registry.fallback_chain("gpt-4o-mini")] == ["gpt-4o-mini", "smollm2"]
    providers = {s.provider for s in registry.all()}
    assert providers == {"openai", "azure-openai", "openai-compatible", "llama.cpp"}
    assert registry.get("llama3").base_url == "http://localhost:11434/v1"
    assert registry.get("qwen2.5-7b").model == "Qwen/Qwen2.5-7B-Instruct"
    assert all(s.context_window > 0 for s in registry.all())
    assert registry.get("gpt-4o-mini").input_price > 0


def test_unknown_name_suggests_the_closest(tmp_path: Path) -> None:
    registry = load(tmp_path, GOOD)
    with pytest.raises(NotFound) as caught:
        registry.get("gpt-4o-mni")
    assert (
        str(caught.value)
        == "No model named 'gpt-4o-mni'. Did you mean 'gpt-4o-mini'? See /model list."
    )
    with pytest.raises(NotFound) as caught:
        registry.get("zzzzzz")
    assert str(caught.value) == "No model named 'zzzzzz'. See /model list."
    # Each adapter can point to its own command instead.
    assert caught.value.pointing_to("`switchboard models list`") == (
        "No model named 'zzzzzz'. See `switchboard models list`."
    )


def test_relative_gguf_path_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    registry = load(tmp_path, '[models.mine]\nprovider = "llama.cpp"\npath = "models/x.gguf"\n')
    assert registry.get("mine").path == str(tmp_path / "models" / "x.gguf")
    assert registry.default_model == "mine"  # the first model when none is named


ENTRY = '[models.m]\nprovider = "openai-compatible"\nbase_url = "http://h/v1"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default_model = 'a'\n[models.a\nprovider='openai'", "invalid TOML"),
        (
            '[models.m]\nprovider = "anthropic"\n',
            "unknown provider 'anthropic' (choose one of openai, azure-openai, openai-compatible, llama.cpp)",
        ),
        (ENTRY + "tempurature = 0.5\n", "unknown key 'tempurature' (did you mean 'temperature'?)"),
        (
            '[models.m]\nprovider = "openai-compatible"\n',
            'provider "openai-compatible" needs base_url',
        ),
        (
            '[models.m]\nprovider = "azure-openai"\nbase_url = "https://x"\n',
            'provider "azure-openai" needs api_version',
        ),
        ('[models.m]\nprovider = "azure-openai"\n', "needs base_url and api_version"),
        (
            '[models.m]\nprovider = "llama.cpp"\n',
            'provider "llama.cpp" needs path (a .gguf file) or bundled',
        ),
        (
            '[models.m]\nprovider = "llama.cpp"\nbundled = "gpt-5"\n',
            "unknown bundled model 'gpt-5'",
        ),
        (
            '[models.m]\nprovider = "llama.cpp"\nbundled = "smollm2-135m-instruct"\npath = "a.gguf"\n',
            "path or bundled, not both",
        ),
        (ENTRY + 'fallback = "other"\n', "model 'm': fallback 'other' is not a defined model."),
        (ENTRY + 'fallback = "m"\n', "cannot be its own fallback"),
        ('default_model = "nope"\n' + ENTRY, "default_model 'nope' is not a defined model."),
        (ENTRY + "temperature = 'hot'\n", "'temperature': input should be a valid number"),
        (ENTRY + "context_window = 0\n", "'context_window'"),
        ("default_model = 'm'\n", "no models defined"),
        ("models = 3\n", "no models defined"),
        ("[models]\nm = 3\n", "models.m must be a table"),
        ("bogus = 1\n" + ENTRY, "unknown top-level key 'bogus'"),
        ('[models."has space"]\nprovider = "openai"\n', "model names are 1-64 letters"),
        (ENTRY + 'name = "x"\n', "'name' cannot be set in the file"),
        ('[models.m]\nmodel = "x"\n', "'provider' is required"),
    ],
)
def test_validation_errors_name_the_file_and_the_model(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        ModelRegistry.from_toml(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    if "[models.m]" in text and "bogus" not in text and "default_model" not in text:
        assert "model 'm'" in message


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3"):
        load(tmp_path, 'default_model = "m"\n\n[models.m\nprovider = "openai"\n')


def test_fallback_cycle(tmp_path: Path) -> None:
    text = (
        '[models.a]\nprovider = "openai"\nfallback = "b"\n'
        '[models.b]\nprovider = "openai"\nfallback = "c"\n'
        '[models.c]\nprovider = "openai"\nfallback = "a"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert "model 'a': fallbacks go round in a circle (a -> b -> c -> a)" in str(caught.value)


@pytest.mark.parametrize("key", ["api_key", "openai_api_key", "key", "API_KEY"])
def test_literal_key_is_refused_without_echoing_it(tmp_path: Path, key: str) -> None:
    secret = "sk-proj-THISISASECRETKEY1234567890"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'[models.m]\nprovider = "openai"\n{key} = "{secret}"\n')
    message = str(caught.value)
    assert secret not in message and "sk-proj" not in message
    assert "environment variable" in message and "api_key_env" in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_key_pasted_into_api_key_env_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = "sk-proj-THISISASECRETKEY1234567890"
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'[models.m]\nprovider = "openai"\napi_key_env = "{secret}"\n')
    assert secret not in str(caught.value)
    assert "api_key_env must be the NAME of an environment variable" in str(caught.value)


def test_add_runtime_models(tmp_path: Path) -> None:
    registry = load(tmp_path, GOOD)
    tuned = ModelSpec(
        name="ft-gpt", provider="openai", model="ft:gpt-4o-mini:org::abc", fallback="gpt-4o-mini"
    )
    added = registry.add(tuned)
    assert added.origin == "database" and registry.get("ft-gpt") == added
    # A database model may be replaced by a newer version of itself.
    registry.add(tuned.model_copy(update={"description": "v2"}))
    assert registry.get("ft-gpt").description == "v2"
    assert [s.name for s in registry.fallback_chain("ft-gpt")] == [
        "ft-gpt",
        "gpt-4o-mini",
        "llama3",
        "smollm2",
    ]
    registry.remove("ft-gpt")
    assert "ft-gpt" not in registry


def test_add_refuses_to_replace_config_models_or_dangle(tmp_path: Path) -> None:
    registry = load(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="already defined in"):
        registry.add(ModelSpec(name="llama3", provider="openai"))
    with pytest.raises(ConfigError, match="fallback 'nowhere' is not a known model"):
        registry.add(ModelSpec(name="new", provider="openai", fallback="nowhere"))
    with pytest.raises(ConfigError, match="remove it from that file"):
        registry.remove("llama3")
    assert registry.get("llama3").origin == "config"


def test_spec_is_frozen_and_strict() -> None:
    spec = ModelSpec(name="x", provider="openai")
    with pytest.raises(ValueError):
        spec.provider = "azure-openai"  # type: ignore[misc]
    with pytest.raises(ValueError):
        ModelSpec(name="x", provider="openai", colour="blue")  # type: ignore[call-arg]
    assert hash(spec) == hash(ModelSpec(name="x", provider="openai"))


def test_the_registry_takes_lora_only_for_local_models_and_resolves_it_beside_the_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "conf" / "switchboard.toml"
    config.parent.mkdir()
    config.write_text(
        '[models.cand]\nprovider = "llama.cpp"\nbundled = "smollm2-135m-instruct"\n'
        'lora = "adapters/zorbia.gguf"\n'
    )
    spec = ModelRegistry.from_toml(config).get("cand")
    assert spec.lora == str(tmp_path / "conf" / "adapters" / "zorbia.gguf")
    config.write_text('[models.remote]\nprovider = "openai"\nlora = "zorbia.gguf"\n')
    with pytest.raises(ConfigError, match='only works with provider "llama.cpp"'):
        ModelRegistry.from_toml(config)


TWO = ENTRY + '[models.n]\nprovider = "openai-compatible"\nbase_url = "http://h/v1"\n'


def test_comparison_models_and_arena_pool_are_defined_models(tmp_path: Path) -> None:
    registry = load(tmp_path, 'comparison_models = ["n"]\narena_pool = ["n", "m"]\n' + TWO)
    assert registry.comparison_models == ("n",) and registry.arena_pool == ("n", "m")
    plain = load(tmp_path, TWO)
    assert plain.comparison_models == () and plain.arena_pool == (), "unset: none, every model"


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        (
            'comparison_models = ["mm"]\n',
            "comparison_models: 'mm' is not a defined model. Did you mean 'm'?",
        ),
        ('arena_pool = ["m", "x"]\n', "arena_pool: 'x' is not a defined model."),
        ('arena_pool = ["m", "m"]\n', "arena_pool names m more than once."),
        ('arena_pool = ["m"]\n', "arena_pool needs at least 2 models"),
        ('arena_pool = "m, n"\n', "arena_pool must be a list of model names"),
        ("comparison_models = [1]\n", "comparison_models must be a list of model names"),
        (
            'comparison_models = ["m", "n", "m2", "m3"]\n',
            "comparison_models lists 4 models; at most 3",
        ),
    ],
)
def test_bad_comparison_and_arena_lists_are_one_line_naming_the_file(
    tmp_path: Path, top: str, expected: str
) -> None:
    extra = "".join(
        f'[models.{name}]\nprovider = "openai-compatible"\nbase_url = "http://h/v1"\n'
        for name in ("m2", "m3")
    )
    path = write(tmp_path, top + TWO + extra)
    with pytest.raises(ConfigError) as caught:
        ModelRegistry.from_toml(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)
