"""What every spec file (a sensitivity study, a validation case) starts with: a TOML table of known
keys, a name that can name a directory, and an optional base config read relative to the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlbsim.config import ConfigError, read_toml


def read_spec(path: str | Path, what: str, keys: set[str] | frozenset[str],
              base_key: str = "base") -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(the file's table, its name, its base config's table or {}): one line naming the problem
    (ConfigError) for an unreadable file, an unknown key, a name that is not letters, digits, '_' and
    '-', or a base that is not a path to a readable config."""
    path = Path(path)
    data = read_toml(path, what)
    unknown = set(data) - set(keys)
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"{path}: unknown {what} key")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError("name", f"{path}: letters, digits, '_' and '-' only (it names the output directory)")
    base: dict[str, Any] = {}
    if base_key in data:
        if not isinstance(data[base_key], str):
            raise ConfigError(base_key, f"{path}: must be a path to a config TOML")
        base = read_toml((path.parent / data[base_key]).resolve(), "base config", base_key)
    return data, name, base
