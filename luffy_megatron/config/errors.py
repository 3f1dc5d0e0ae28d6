"""The error a user gets for a configuration that cannot run."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user has to fix; the message names the dotted key and what to do."""


def problems_error(problems: list[str]) -> ConfigError:
    """One ConfigError for a non-empty list of problems: the problem itself, or "N problems:" and a line each."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"{len(problems)} problems:\n" + "\n".join(f"  - {problem}" for problem in problems))
