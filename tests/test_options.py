"""SandboxOptions and TemplateSpec: defaults, aliases, validation messages, secrets, hashing."""

from __future__ import annotations

import pickle
import posixpath
import traceback
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.options import DEFAULT_MAX_OUTPUT_BYTES, SandboxOptions, TemplateSpec

ALIASES = {
    "timeout_ms": "timeoutMs",
    "work_dir": "workDir",
    "allow_internet_access": "allowInternetAccess",
    "exec_timeout_ms": "execTimeoutMs",
    "sandbox_id": "sandboxId",
    "api_key": "apiKey",
}
SECRET = "e2b_secret_0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2B_API_KEY", raising=False)


def _config_error(**fields: Any) -> str:
    with pytest.raises(ConfigError) as info:
        SandboxOptions(**fields)
    return str(info.value)


# -- defaults and names ---------------------------------------------------------------------
def test_defaults_match_the_spec() -> None:
    options = SandboxOptions()
    assert options.api_key is None
    assert options.template == "base"
    assert options.timeout_ms == 300_000
    assert options.work_dir == "/home/user"
    assert options.envs == {}
    assert options.metadata == {}
    assert options.allow_internet_access is True
    assert options.exec_timeout_ms == 120_000
    assert options.sandbox_id is None
    assert options.domain is None
    assert options.max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES == 8 * 1024 * 1024


def test_mutable_defaults_are_not_shared() -> None:
    assert SandboxOptions().envs is not SandboxOptions().envs


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("timeout_ms", 5_000),
        ("work_dir", "/srv/app"),
        ("allow_internet_access", False),
        ("exec_timeout_ms", 750),
        ("sandbox_id", "sbx-42"),
    ],
)
def test_camel_case_aliases_and_snake_case_mean_the_same(name: str, value: object) -> None:
    by_alias = SandboxOptions(**{ALIASES[name]: value})
    by_name = SandboxOptions(**{name: value})
    assert getattr(by_alias, name) == getattr(by_name, name) == value
    assert by_alias == by_name


def test_api_key_alias() -> None:
    options = SandboxOptions(apiKey=SECRET)
    assert isinstance(options.api_key, SecretStr)
    assert options.api_key.get_secret_value() == SECRET
    assert SandboxOptions(api_key=SECRET) == options


def test_the_same_option_twice_is_named_clearly() -> None:
    message = _config_error(timeoutMs=5, timeout_ms=7)
    assert "'timeout_ms' given twice" in message
    assert "'timeoutMs'" in message


def test_options_are_frozen() -> None:
    options = SandboxOptions()
    with pytest.raises(ValidationError, match="frozen"):
        options.timeout_ms = 1  # type: ignore[misc]


def test_work_dir_is_normalised() -> None:
    assert SandboxOptions(work_dir="/srv//app/./x/../").work_dir == "/srv/app"


def test_template_accepts_a_name_a_spec_or_a_spec_dict() -> None:
    spec = TemplateSpec(base="node", npm_packages=["left-pad"])
    assert SandboxOptions(template="my-template").template == "my-template"
    assert SandboxOptions(template=spec).template == spec
    assert SandboxOptions(template={"base": "node", "npm_packages": ["left-pad"]}).template == spec


# -- validation messages --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"bogus": 1}, ["unknown option 'bogus'", "allowed options:", "timeout_ms", "work_dir"]),
        ({"timeout_ms": 0}, ["timeout_ms=0", "greater than 0"]),
        ({"timeoutMs": -5}, ["timeoutMs=-5", "greater than 0"]),
        ({"exec_timeout_ms": -1}, ["exec_timeout_ms=-1", "greater than 0"]),
        ({"max_output_bytes": 0}, ["max_output_bytes=0", "greater than 0"]),
        ({"timeout_ms": True}, ["timeout_ms=True", "valid integer"]),
        ({"exec_timeout_ms": False}, ["exec_timeout_ms=False", "valid integer"]),
        ({"timeout_ms": 1.5}, ["timeout_ms=1.5", "valid integer"]),
        ({"timeout_ms": "100"}, ["timeout_ms='100'", "valid integer"]),
        ({"work_dir": "home/user"}, ["work_dir='home/user'", "absolute path"]),
        ({"envs": {"DEBUG": 1}}, ["envs.DEBUG=1", "valid string"]),
        ({"envs": {"A": "ok", "B": None}}, ["envs.B=None", "valid string"]),
        ({"metadata": {"team": 7}}, ["metadata.team=7", "valid string"]),
        ({"allow_internet_access": "yes"}, ["allow_internet_access='yes'", "valid boolean"]),
        ({"sandbox_id": "  "}, ["sandbox_id='  '", "non-empty"]),
    ],
)
def test_bad_values_raise_config_error_naming_field_value_and_rule(
    fields: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxOptions(**fields)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, KodeError)
    message = str(info.value)
    assert message.startswith("invalid SandboxOptions:")
    for part in expected:
        assert part in message


def test_several_offenders_are_listed_one_per_line() -> None:
    lines = _config_error(timeout_ms=0, work_dir="rel", nope=1).splitlines()
    assert lines[0] == "invalid SandboxOptions:"
    assert len(lines) == 4
    assert all(line.startswith("- ") for line in lines[1:])


def test_config_error_does_not_chain_pydantic_noise() -> None:
    with pytest.raises(ConfigError) as info:
        SandboxOptions(timeout_ms=0)
    assert info.value.__suppress_context__


# -- secrets --------------------------------------------------------------------------------
def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", SECRET)
    options = SandboxOptions()
    assert options.api_key is not None
    assert options.api_key.get_secret_value() == SECRET
    monkeypatch.setenv("E2B_API_KEY", "")
    assert SandboxOptions().api_key is None


def test_explicit_api_key_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", "from-env")
    options = SandboxOptions(api_key=SECRET)
    assert options.api_key is not None and options.api_key.get_secret_value() == SECRET


def test_api_key_never_appears_in_repr_str_dumps_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", SECRET)
    options = SandboxOptions()
    texts = [repr(options), str(options), options.model_dump_json(), str(options.model_dump())]
    for bad in ({"timeout_ms": 0}, {"apiKey": [SECRET]}, {"api_key": {"k": SECRET}}, {"x": SECRET}):
        with pytest.raises(ConfigError) as info:
            SandboxOptions(**bad)
        texts.append(str(info.value))
        texts.append("".join(traceback.format_exception(info.value)))
        texts.append(repr(info.value))
    with pytest.raises(ConfigError) as info:
        options.replace(timeout_ms=-1)
    texts.append("".join(traceback.format_exception(info.value)))
    for text in texts:
        assert SECRET not in text
    assert any("apiKey=<hidden>" in text for text in texts)


# -- replace --------------------------------------------------------------------------------
def test_replace_returns_a_validated_copy() -> None:
    original = SandboxOptions(envs={"A": "1"}, api_key=SECRET)
    changed = original.replace(timeout_ms=10, envs={"B": "2"})
    assert changed.timeout_ms == 10 and changed.envs == {"B": "2"}
    assert changed.api_key == original.api_key
    assert original.timeout_ms == 300_000 and original.envs == {"A": "1"}
    with pytest.raises(ConfigError, match="timeout_ms=0"):
        original.replace(timeout_ms=0)
    with pytest.raises(ConfigError, match="unknown option 'tiemout_ms'"):
        original.replace(tiemout_ms=5)


def test_replace_accepts_camel_case_aliases() -> None:
    changed = SandboxOptions().replace(timeoutMs=5, workDir="/w", sandboxId="sbx-1")
    assert (changed.timeout_ms, changed.work_dir, changed.sandbox_id) == (5, "/w", "sbx-1")
    with pytest.raises(ConfigError, match="given twice"):
        SandboxOptions().replace(timeoutMs=5, timeout_ms=6)


# -- fingerprint ----------------------------------------------------------------------------
def test_fingerprint_is_equal_for_equal_options() -> None:
    first = SandboxOptions(envs={"A": "1", "B": "2"}, metadata={"x": "y"})
    second = SandboxOptions(envs={"B": "2", "A": "1"}, metadata={"x": "y"})
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 16
    int(first.fingerprint(), 16)


@pytest.mark.parametrize(
    "change",
    [
        {"template": "other"},
        {"template": TemplateSpec()},
        {"timeout_ms": 1},
        {"work_dir": "/srv"},
        {"envs": {"A": "1"}},
        {"metadata": {"k": "v"}},
        {"allow_internet_access": False},
        {"exec_timeout_ms": 1},
        {"domain": "e2b.example"},
        {"max_output_bytes": 1024},
    ],
    ids=lambda change: next(iter(change)),
)
def test_fingerprint_changes_with_every_shaping_field(change: dict[str, Any]) -> None:
    assert SandboxOptions(**change).fingerprint() != SandboxOptions().fingerprint()


def test_fingerprint_ignores_secret_and_resume_id() -> None:
    base = SandboxOptions().fingerprint()
    assert SandboxOptions(api_key=SECRET).fingerprint() == base
    assert SandboxOptions(sandbox_id="sbx-123").fingerprint() == base


def test_fingerprint_distinguishes_template_specs() -> None:
    python = SandboxOptions(template=TemplateSpec(pip_packages=["requests"]))
    node = SandboxOptions(template=TemplateSpec(base="node"))
    assert python.fingerprint() != node.fingerprint()


# -- TemplateSpec ---------------------------------------------------------------------------
def test_template_spec_defaults_and_tuples() -> None:
    spec = TemplateSpec(apt_packages=["curl"], pip_packages=["httpx", "rich"])
    assert spec.base == "python" and spec.cpu_count == 2 and spec.memory_mb == 512
    assert spec.pip_packages == ("httpx", "rich")
    assert spec.work_dir is None and spec.dockerfile is None
    with pytest.raises(ValidationError, match="frozen"):
        spec.base = "node"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"base": "alpine"}, "base='alpine'"),
        ({"cpu_count": 0}, "cpu_count=0"),
        ({"memory_mb": True}, "memory_mb=True"),
        ({"pip_packages": "requests"}, "pip_packages='requests'"),
        ({"apt_packages": ["ok", 3]}, "apt_packages.1=3"),
        ({"work_dir": "app"}, "absolute path"),
        ({"packages": ["x"]}, "unknown option 'packages'"),
    ],
)
def test_template_spec_validation(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        TemplateSpec(**fields)
    assert str(info.value).startswith("invalid TemplateSpec:")
    assert expected in str(info.value)


def test_template_spec_digest_is_a_content_hash() -> None:
    spec = TemplateSpec(pip_packages=["a", "b"])
    assert spec.digest() == TemplateSpec(pip_packages=("a", "b")).digest()
    assert spec.digest() != TemplateSpec(pip_packages=["b", "a"]).digest()
    assert spec.digest() != TemplateSpec(pip_packages=["a", "b"], memory_mb=1024).digest()
    assert spec.digest() != TemplateSpec().digest()
    assert len(spec.digest()) == 16
    assert spec.replace(memory_mb=1024) == TemplateSpec(pip_packages=["a", "b"], memory_mb=1024)


def test_options_pickle_round_trip() -> None:
    # xdist and the id cache move options between processes.
    options = SandboxOptions(template=TemplateSpec(base="node"), envs={"A": "1"}, api_key=SECRET)
    assert pickle.loads(pickle.dumps(options)) == options


# -- properties -----------------------------------------------------------------------------
# A fixed alphabet (with non-ASCII): st.text()'s default builds a unicode table on a cold start,
# which alone trips Hypothesis's too_slow health check in a fresh checkout.
_text = st.text("abcXYZ019 _-./=é€😀\n", max_size=12)
_positive = st.integers(min_value=1, max_value=2**40)
_abs_path = st.lists(st.text("abz09_.-", min_size=1, max_size=8), max_size=4).map(
    lambda parts: "/" + "/".join(parts)
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "template": st.one_of(_text, st.builds(TemplateSpec, base=st.sampled_from(["python", "node"]))),
    "timeout_ms": _positive,
    "work_dir": _abs_path,
    "envs": st.dictionaries(_text, _text, max_size=3),
    "metadata": st.dictionaries(_text, _text, max_size=3),
    "allow_internet_access": st.booleans(),
    "exec_timeout_ms": _positive,
    "sandbox_id": st.none() | _text.filter(lambda s: s.strip() != ""),
    "domain": st.none() | _text,
    "max_output_bytes": _positive,
}


@st.composite
def _valid_options(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(_FIELDS))))
    return {
        (ALIASES[name] if name in ALIASES and draw(st.booleans()) else name): draw(_FIELDS[name])
        for name in names
    }


@given(_valid_options())
def test_valid_option_dicts_round_trip(data: dict[str, Any]) -> None:
    options = SandboxOptions(**data)
    reverse = {alias: name for name, alias in ALIASES.items()}
    for key, value in data.items():
        name = reverse.get(key, key)
        expected = posixpath.normpath(value) if name == "work_dir" else value
        assert getattr(options, name) == expected
    again = SandboxOptions(**options.model_dump())
    assert again == options
    assert again.fingerprint() == options.fingerprint()
    assert SandboxOptions(**options.model_dump(by_alias=True)) == options


_bad_timeout = st.one_of(
    st.integers(max_value=0),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@given(
    st.sampled_from(["timeout_ms", "timeoutMs", "exec_timeout_ms", "execTimeoutMs"]), _bad_timeout
)
def test_any_invalid_timeout_is_rejected_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxOptions(**{key: value})
    assert f"- {key}=" in str(info.value)
