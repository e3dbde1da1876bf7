"""Where a config comes from: a YAML file, and `${VAR}` references expanded from an
environment (the operator's, for `gateway check` and `gateway deploy`; see README)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
"""A `${VAR}` / `${VAR:-default}` reference, or the escape `$${` (a literal `${`, as in
docker-compose); group 1 is None for the escape."""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key path and why."""


class DeployError(Exception):
    """A valid config the running gateway cannot apply; nothing was changed. The message
    quotes no config value (the gateway cannot tell which came from a secret)."""


def _expand(value: Any, path: str, env: Mapping[str, str], used: dict[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string of the parsed YAML tree, as a
    shell does (`:-` also takes the default for a variable set to ""); `used` collects the
    values put in, so that no error message repeats one."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var is None:
                return "${"  # `$${`: a literal `${`
            got = env.get(var)
            if got is None or (got == "" and default is not None):
                if default is None:
                    raise ConfigError(
                        f"{path or '<root>'}: environment variable ${{{var}}} is not set")
                return default
            used[var] = got
            return got

        return ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), env, used)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env, used) for i, v in enumerate(value)]
    return value


def expand_env(data: Any, source: str, env: Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """`data` with `${VAR}` references expanded from `env`, and the values used (by name)."""
    used: dict[str, str] = {}
    try:
        return _expand(data, "", env, used), used
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _forms(value: str) -> set[str]:
    """The ways a message may spell `value`: as is, and escaped as `repr`, `ascii` and JSON
    put it (an error message quoting `{value!r}` doubles a backslash, spells a tab `\\t`)."""
    forms = {value, repr(value)[1:-1], ascii(value)[1:-1], json.dumps(value)[1:-1],
             value.encode("unicode_escape").decode("ascii")}
    for quote in ("'", '"'):  # repr picks its quote by content; either may be quoted
        forms.add(value.replace("\\", "\\\\").replace(quote, "\\" + quote))
    return {f for f in forms if f}


def hide_values(message: str, used: Mapping[str, str]) -> str:
    """`message` with every expanded value (raw or escaped) put back as its `${VAR}` (it
    may be a secret)."""
    pairs = [(form, var) for var, value in used.items() if len(value) >= 3
             for form in _forms(value)]
    for form, var in sorted(pairs, key=lambda fv: -len(fv[0])):
        message = message.replace(form, f"${{{var}}}")
    return message


def escape_refs(data: Any) -> Any:
    """Every `${` in the strings of `data` as `$${`: expanded text sent on (by `gateway
    deploy`) keeps a value's own `${` literal instead of reading as a reference."""
    return _map_strings(data, lambda s: s.replace("${", "$${"))


def unescape_refs(data: Any) -> Any:
    """The inverse of `escape_refs`, for a config that arrives already expanded."""
    return _map_strings(data, lambda s: s.replace("$${", "${"))


def _map_strings(data: Any, f: Any) -> Any:
    if isinstance(data, str):
        return f(data)
    if isinstance(data, dict):
        return {k: _map_strings(v, f) for k, v in data.items()}
    if isinstance(data, list):
        return [_map_strings(v, f) for v in data]
    return data


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The parsed YAML of a config file, not yet expanded or validated."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None


def unexpanded(data: Any, path: str = "") -> str | None:
    """The key path of the first string still holding a `${VAR}` reference (not an escaped
    `$${`), if any."""
    if isinstance(data, str):
        refs = (m for m in ENV_REF.finditer(data) if m.group(1) is not None)
        return (path or "<root>") if next(refs, None) else None
    items = (data.items() if isinstance(data, dict)
             else enumerate(data) if isinstance(data, list) else ())
    for k, v in items:
        found = unexpanded(v, f"{path}[{k}]" if isinstance(k, int)
                           else (f"{path}.{k}" if path else str(k)))
        if found:
            return found
    return None


def _string_keys(v: Any, depth: int = 0) -> None:
    """JSON turns a key 0 or true into "0" or "true": the model would look up keys it was
    not given (and {1: a, "1": b} would lose one), so such keys are refused at any depth."""
    if depth > 100:
        raise ValueError("nested more than 100 levels deep")
    if isinstance(v, dict):
        for k, item in v.items():
            if not isinstance(k, str):
                raise TypeError(f"key {k!r} is not a string (quote it in YAML)")
            _string_keys(item, depth + 1)
    elif isinstance(v, list | tuple):
        for item in v:
            _string_keys(item, depth + 1)


def plain_json(v: Any, name: str) -> None:
    """ValueError unless `v` is what JSON carries unchanged (string keys, no dates or sets)."""
    try:
        _string_keys(v)
        json.dumps(v)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{name} must be plain JSON data ({e})") from None
