"""Where a config comes from: a YAML file, and `${VAR}` references expanded from an
environment (the operator's, for `gateway check` and `gateway deploy`; see README)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key path and why."""


def _expand(value: Any, path: str, env: Mapping[str, str], used: dict[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string of the parsed YAML tree, as a
    shell does (`:-` also takes the default for a variable set to ""); `used` collects the
    values put in, so that no error message repeats one."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
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


def hide_values(message: str, used: Mapping[str, str]) -> str:
    """`message` with every expanded value put back as its `${VAR}` (it may be a secret)."""
    for var, value in sorted(used.items(), key=lambda kv: -len(kv[1])):
        if len(value) >= 3:
            message = message.replace(value, f"${{{var}}}")
    return message


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
    """The key path of the first string still holding a `${VAR}` reference, if any."""
    if isinstance(data, str):
        return (path or "<root>") if ENV_REF.search(data) else None
    items = (data.items() if isinstance(data, dict)
             else enumerate(data) if isinstance(data, list) else ())
    for k, v in items:
        found = unexpanded(v, f"{path}[{k}]" if isinstance(k, int)
                           else (f"{path}.{k}" if path else str(k)))
        if found:
            return found
    return None
