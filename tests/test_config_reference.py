"""
docs/configuration.md and the configuration schema stay in step.

The reference has one ``##`` section per table, headed with the table as
written in TOML (``## `[server]` ``, ``## `[[listener]]` ``), and one ``###``
heading per key (``### `idle_timeout` ``).  Every key of
:data:`kumoauth.config.SCHEMA` must be documented under its table, every key
documented must exist, and a default written as a TOML literal right after
"**Default:**" must be the dataclass default.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kumoauth import config
from kumoauth.auth.checkers import BUILTIN
from kumoauth.config import SCHEMA as CORE_SCHEMA

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

_SECTION = re.compile(r"^## (?P<title>.*)$")
_TABLE = re.compile(r"^`\[(?P<open>\[?)(?P<name>[a-z_][a-z0-9_.-]*)\]?\]`$")
_KEY = re.compile(r"^### (?P<title>.*)$")
_KEY_TITLE = re.compile(r"^`(?P<key>[a-z_][a-z0-9_]*)`$")
_DEFAULT = re.compile(r"^\s*-\s+\*\*Default:\*\*\s+(?P<rest>.*)$")
_LITERAL = re.compile(r"^`(?P<value>[^`]+)`")

#: SCHEMA table -> the dataclass that holds its defaults.
DATACLASSES = {
    "server": config.ServerConfig,
    "tls": config.TLSConfig,
    "listener": config.ListenerConfig,
    "auth": config.AuthConfig,
    "auth.throttle": config.ThrottleConfig,
    "auth.cache": config.CacheConfig,
    "policy": config.PolicyConfig,
    "spool": config.SpoolConfig,
    "log": config.LogConfig,
    "metrics": config.MetricsConfig,
    "relay": config.RelayConfig,
    "limits": config.LimitsConfig,
}

#: every table an operator can write: kumoauth's own, and the built-in
#: credential stores' ``[auth.<name>]`` (each module's ``SCHEMA`` and
#: ``Config``)
SCHEMA: dict[str, dict[str, Any]] = dict(CORE_SCHEMA)
for _name, _target in BUILTIN.items():
    _module = importlib.import_module(_target.partition(":")[0])
    SCHEMA[f"auth.{_name}"] = _module.SCHEMA
    DATACLASSES[f"auth.{_name}"] = _module.Config
# [auth.oauth]: the token validator's own table
_oauth = importlib.import_module("kumoauth.backends.oauth")
SCHEMA["auth.oauth"] = _oauth.SCHEMA
DATACLASSES["auth.oauth"] = _oauth.Config
# [sender_binding]: the binding engine's own table
_senders = importlib.import_module("kumoauth.auth.senders")
SCHEMA["sender_binding"] = _senders.SCHEMA
DATACLASSES["sender_binding"] = _senders.SenderBindingConfig


@dataclasses.dataclass
class Key:
    table: str
    name: str
    line: int
    lines: list[str] = dataclasses.field(default_factory=list)


def parse_reference(text: str) -> tuple[dict[str, dict[str, Key]], list[str]]:
    """
    The documented keys by table, and the problems with the document's
    structure (a ``###`` heading in a table section that is not a key, a
    table or key documented twice, a ``[[...]]`` heading for a plain table).
    """
    tables: dict[str, dict[str, Key]] = {}
    problems: list[str] = []
    table: str | None = None
    key: Key | None = None
    in_code = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            if key is not None:
                key.lines.append(line)
            continue
        if m := _SECTION.match(line):
            key = None
            t = _TABLE.match(m["title"].strip())
            if t is None:
                table = None  # intro, summary: not a table
                continue
            table = t["name"]
            if bool(t["open"]) != (table == "listener"):
                problems.append(f"line {number}: heading {m['title']!r} for table {table!r}")
            if table in tables:
                problems.append(f"line {number}: table [{table}] documented twice")
            tables.setdefault(table, {})
            continue
        if m := _KEY.match(line):
            key = None
            if table is None:
                continue
            k = _KEY_TITLE.match(m["title"].strip())
            if k is None:
                problems.append(
                    f"line {number}: heading {m['title']!r} in [{table}] is not a `key`"
                )
                continue
            if k["key"] in tables[table]:
                problems.append(f"line {number}: [{table}] {k['key']} documented twice")
            key = tables[table][k["key"]] = Key(table, k["key"], number)
            continue
        if key is not None:
            key.lines.append(line)
    return tables, problems


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Key]]:
    tables, problems = parse_reference(REFERENCE.read_text(encoding="utf-8"))
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)
    return tables


def _all_keys() -> list[tuple[str, str]]:
    return [(table, key) for table, keys in SCHEMA.items() for key in keys]


def test_every_table_has_a_section(reference):
    missing = [table for table in SCHEMA if table not in reference]
    assert not missing, "tables missing from docs/configuration.md: " + ", ".join(
        f"[{t}]" for t in missing
    )


def test_every_documented_table_exists(reference):
    unknown = [table for table in reference if table not in SCHEMA]
    assert not unknown, "docs/configuration.md documents tables not in SCHEMA: " + ", ".join(
        f"[{t}]" for t in unknown
    )


@pytest.mark.parametrize("table,key", _all_keys(), ids=lambda v: v)
def test_schema_key_is_documented(reference, table, key):
    if key not in reference.get(table, {}):
        pytest.fail(
            f"[{table}] {key} is in SCHEMA but not documented under [{table}] in "
            "docs/configuration.md",
            pytrace=False,
        )


def test_every_documented_key_exists(reference):
    unknown = [
        f"[{table}] {key} (line {entry.line})"
        for table, keys in reference.items()
        for key, entry in keys.items()
        if key not in SCHEMA.get(table, {})
    ]
    assert not unknown, "docs/configuration.md documents keys not in SCHEMA: " + ", ".join(unknown)


def _fields(entry: Key) -> dict[str, str]:
    """
    The ``- **Name:** text`` items of a key, by name.
    """
    found: dict[str, str] = {}
    for line in entry.lines:
        if m := re.match(r"^\s*-\s+\*\*(?P<name>[A-Za-z ]+):\*\*\s+(?P<rest>.*)$", line):
            found[m["name"]] = m["rest"]
    return found


def test_every_documented_key_has_type_default_meaning_reload(reference):
    incomplete = []
    for table, keys in reference.items():
        for key, entry in keys.items():
            missing = {"Type", "Default", "Meaning", "Reload"} - set(_fields(entry))
            if missing:
                incomplete.append(f"[{table}] {key}: no {', '.join(sorted(missing))}")
    assert not incomplete, "docs/configuration.md:\n" + "\n".join(incomplete)


def _default(table: str, key: str) -> Any:
    """
    The dataclass default of a key, or ``dataclasses.MISSING``.
    """
    for f in dataclasses.fields(DATACLASSES[table]):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return dataclasses.MISSING
    raise AssertionError(f"{DATACLASSES[table].__name__} has no field {key!r} for [{table}] {key}")


def _same(documented: Any, actual: Any) -> bool:
    if isinstance(actual, bool) or isinstance(documented, bool):
        return type(documented) is type(actual) and documented == actual
    if isinstance(actual, tuple):
        actual = list(actual)
    if isinstance(actual, int | float) and isinstance(documented, int | float):
        return float(documented) == float(actual)
    return type(documented) is type(actual) and documented == actual


def test_dataclass_for_every_mapped_table_exists():
    assert set(DATACLASSES) <= set(SCHEMA), "DATACLASSES names a table that SCHEMA lacks"


def test_documented_defaults_match_the_dataclasses(reference):
    """
    A default written as a literal (``- **Default:** `300` ``) must parse as
    TOML and equal the dataclass default; a default written in words
    ("none: required", "the host's fully qualified name") is not checked.
    """
    wrong = []
    for table, keys in reference.items():
        if table not in DATACLASSES:
            continue
        for key, entry in keys.items():
            if key not in SCHEMA.get(table, {}):
                continue  # reported by test_every_documented_key_exists
            text = _fields(entry).get("Default", "")
            literal = _LITERAL.match(text)
            if literal is None:
                continue
            try:
                documented = tomllib.loads(f"v = {literal['value']}")["v"]
            except tomllib.TOMLDecodeError:
                wrong.append(f"[{table}] {key}: default `{literal['value']}` is not TOML")
                continue
            actual = _default(table, key)
            if actual is dataclasses.MISSING or actual is None:
                wrong.append(
                    f"[{table}] {key}: documented default {literal['value']}, but the code has none"
                )
            elif not _same(documented, actual):
                wrong.append(
                    f"[{table}] {key}: documented default {literal['value']}, code has {actual!r}"
                )
    assert not wrong, "docs/configuration.md:\n" + "\n".join(wrong)


def test_the_parser_notices_drift():
    """
    A reference missing a key, or naming one the schema lacks, is caught.
    """
    text = "# x\n\n## `[server]`\n\n### `hostname`\n\n### `no_such_key`\n\n## Reload\n"
    tables, problems = parse_reference(text)
    assert not problems
    assert set(tables) == {"server"}
    assert set(tables["server"]) == {"hostname", "no_such_key"}
    _, problems = parse_reference("## `[server]`\n\n### Timeouts\n\n## `[[server]]`\n")
    assert len(problems) == 3
