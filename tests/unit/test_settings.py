"""Settings resolution (``sa_rollback._settings``), without a server.

Every option is resolved from the command line, the environment and the ini
file, in that order of precedence, over its default. The tests are driven by
``OPTIONS``, so a new option is covered as soon as it is declared.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import pytest

from sa_rollback import ConfigurationError
from sa_rollback._settings import OPTIONS, Option, Settings, resolve

BY_FIELD = {option.field: option for option in OPTIONS}
BOOLS = [o for o in OPTIONS if o.kind == "bool"]
FLOATS = [o for o in OPTIONS if o.kind == "float"]


def resolve_one(option: Option, cli: Optional[Any] = None, env: Optional[str] = None, ini: Optional[Any] = None) -> Any:
    """Resolve with only ``option`` set, in the given sources, and return its value."""
    asked: list[str] = []

    def from_cli(field: str) -> Any:
        asked.append(field)
        return cli if field == option.field else None

    def from_ini(key: str) -> Any:
        return ini if key == option.ini else None

    settings = resolve(cli=from_cli, ini=from_ini, env={} if env is None else {option.env: env})
    assert option.field in asked  # the command line is asked by field name, as the plugin stores it
    return getattr(settings, option.field)


def two_values(option: Option) -> list[tuple[str, Any]]:
    """Two raw values of the option's kind that resolve to different values, and what they give."""
    if option.kind == "bool":
        return [("off", False), ("on", True)]
    if option.kind == "float":
        return [("1.5", 1.5), ("2.5", 2.5)]
    if option.field == "server_dir":
        return [("/tmp/sar-one", Path("/tmp/sar-one")), ("/tmp/sar-two", Path("/tmp/sar-two"))]
    return [("value-one", "value-one"), ("value-two", "value-two")]


ORDER = ("cli", "env", "ini")
PAIRS = [(higher, lower) for i, higher in enumerate(ORDER) for lower in ORDER[i + 1 :]]


@pytest.mark.parametrize("swap", [False, True], ids=["a-over-b", "b-over-a"])
@pytest.mark.parametrize(("higher", "lower"), PAIRS, ids=[f"{h}-over-{lo}" for h, lo in PAIRS])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.field)
def test_precedence(option: Option, higher: str, lower: str, swap: bool) -> None:
    (raw_high, expected), (raw_low, _) = reversed(two_values(option)) if swap else two_values(option)
    assert resolve_one(option, **{higher: raw_high, lower: raw_low}) == expected


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.field)
def test_each_source_alone_and_all_three(option: Option) -> None:
    (one, first), (two, second) = two_values(option)
    assert resolve_one(option, cli=one) == first
    assert resolve_one(option, env=one) == first
    assert resolve_one(option, ini=one) == first
    assert resolve_one(option, cli=two, env=one, ini=one) == second
    assert resolve_one(option, cli=one, env=two, ini=two) == first


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.field)
def test_default_when_no_source_sets_it(option: Option) -> None:
    value = resolve_one(option)
    expected = Path(option.default).expanduser() if option.field == "server_dir" else option.default
    assert value == expected


def test_settings_defaults_agree_with_the_options() -> None:
    """``Settings()`` (used by code that builds settings without resolving) has the same defaults."""
    plain = Settings()
    assert {f.name for f in dataclasses.fields(Settings)} == set(BY_FIELD)
    for option in OPTIONS:
        expected = Path(option.default) if option.field == "server_dir" else option.default
        assert getattr(plain, option.field) == expected, option.field


@pytest.mark.parametrize("unset", ["", None, []], ids=["empty", "none", "empty-list"])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.field)
def test_an_empty_ini_value_or_environment_variable_counts_as_unset(option: Option, unset: Any) -> None:
    (one, first), _ = two_values(option)
    assert resolve_one(option, ini=unset) == resolve_one(option)
    assert resolve_one(option, env="", ini=one) == first  # an exported but empty variable


TRUE_WORDS = ("on", "ON", "true", "True", "yes", "1", " on ")
FALSE_WORDS = ("off", "Off", "false", "FALSE", "no", "0", " off\n")


@pytest.mark.parametrize("source", ORDER)
@pytest.mark.parametrize("option", BOOLS, ids=lambda o: o.field)
def test_bool_words(option: Option, source: str) -> None:
    assert [resolve_one(option, **{source: word}) for word in TRUE_WORDS] == [True] * len(TRUE_WORDS)
    assert [resolve_one(option, **{source: word}) for word in FALSE_WORDS] == [False] * len(FALSE_WORDS)


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_given_as_bool_is_taken_as_is(value: bool) -> None:
    for option in BOOLS:
        assert resolve_one(option, ini=value) is value
        assert resolve_one(option, cli=value) is value


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("0.5", 0.5), ("30", 30.0), ("1e-3", 0.001), (" 2 ", 2.0), ("inf", math.inf), ("Infinity", math.inf)],
)
@pytest.mark.parametrize("option", FLOATS, ids=lambda o: o.field)
def test_seconds(option: Option, raw: str, seconds: float) -> None:
    assert resolve_one(option, env=raw) == seconds


def test_strings_are_stripped_and_the_server_dir_expanded() -> None:
    assert resolve_one(BY_FIELD["url"], env="  postgresql://h/db \n") == "postgresql://h/db"
    assert resolve_one(BY_FIELD["server_dir"], ini="~/pg") == Path.home() / "pg"


def _source_name(option: Option, source: str) -> str:
    return {
        "cli": f"the command line option {option.flag}",
        "env": f"the environment variable {option.env}",
        "ini": f"the ini key {option.ini}",
    }[source]


#: (option, source, raw); an empty ini value or variable counts as unset, so only the flag can be empty
BAD = [(o, source, raw) for o in BOOLS for source in ORDER for raw in ("maybe", "2", "onn")] + [
    (o, source, raw)
    for o in FLOATS
    for source in ORDER
    for raw in ("soon", "0", "-1", "nan", "-inf", *([""] if source == "cli" else []))
]


@pytest.mark.parametrize(("option", "source", "raw"), BAD, ids=[f"{o.field}-{s}-{raw!r}" for o, s, raw in BAD])
def test_a_bad_value_names_its_source_the_value_and_the_choices(option: Option, source: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        resolve_one(option, **{source: raw})
    message = str(caught.value)
    assert message.startswith(f"{_source_name(option, source)} is {raw!r}; it takes ")
    assert ("on, off" if option.kind == "bool" else "positive number of seconds, or 'inf'") in message


def test_a_bad_value_of_a_lower_source_is_reported_when_nothing_overrides_it() -> None:
    option = BY_FIELD["enabled"]
    with pytest.raises(ConfigurationError, match="the ini key sa_rollback is 'maybe'"):
        resolve_one(option, ini="maybe")
    assert resolve_one(option, env="off", ini="maybe") is False  # the ini value is not the one in force


def test_without_an_environment_argument_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in OPTIONS:
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.setenv("SA_ROLLBACK_LOCK_TIMEOUT", "7")
    monkeypatch.setenv("SA_ROLLBACK", "off")
    settings = resolve(cli=lambda field: None, ini=lambda key: None)
    assert settings.lock_timeout == 7.0
    assert settings.enabled is False


def test_every_option_has_its_own_flag_ini_key_and_variable() -> None:
    for attribute in ("field", "flag", "ini", "env"):
        values = [getattr(option, attribute) for option in OPTIONS]
        assert len(set(values)) == len(values), attribute
    for option in OPTIONS:
        assert option.flag.startswith("--sa-") and option.env.startswith("SA_ROLLBACK")
        assert option.ini.startswith("sa_rollback") and option.kind in ("string", "bool", "float")
        assert option.help[0].isupper() and not option.help.endswith(".")  # pytest-xdist's help style
