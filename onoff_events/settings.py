"""Reading settings from an environment mapping, with errors that name the setting.

Settings are read once, at the edge, from an injected mapping (``os.environ`` in production,
a plain dict in tests); nothing else in the code touches the environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class SettingsError(ValueError):
    """A setting is missing or malformed. The message names the variable."""


def text(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable's value with surrounding blanks removed, or the default when unset."""
    return env.get(name, default).strip()


def flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean written as 1/0, true/false, yes/no or on/off."""
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def number(
    env: Mapping[str, str],
    name: str,
    default: T,
    parse: Callable[[str], T],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> T:
    """A number parsed with ``parse`` (int or float) and checked against inclusive bounds."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise SettingsError(f"{name}: expected {kind}, got {raw!r}") from None
    assert isinstance(value, int | float)  # noqa: S101 # parse is int or float by contract
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {raw!r}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}: must be at most {maximum}, got {raw!r}")
    return value


def choice(env: Mapping[str, str], name: str, default: str, allowed: frozenset[str]) -> str:
    """One of a fixed set of words (compared as written, after trimming)."""
    value = text(env, name, default)
    if value not in allowed:
        raise SettingsError(f"{name}: must be one of {', '.join(sorted(allowed))}, got {value!r}")
    return value


def log_level(env: Mapping[str, str]) -> str:
    """``LOG_LEVEL``, the same for every service."""
    return choice(env, "LOG_LEVEL", "INFO", frozenset({"DEBUG", "INFO", "WARNING", "ERROR"}))


def mask(secret: str) -> str:
    """How a secret is shown in start-up output: never any of its characters."""
    return "***" if secret else ""


# Query parameters that carry credentials in the URLs we take (libpq's password and
# sslpassword, redis-py's password, tokens and keys of HTTP APIs): any name containing one of
# these words. Masking a harmless one (sslkey, a file path) costs nothing; missing one leaks.
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|auth|credential|signature|sig$", re.I)


def mask_url(url: str) -> str:
    """A URL as shown in logs: the userinfo password and every secret-looking query value
    replaced by ``***``; scheme, user, host, port, path and other parameters kept so an
    operator still sees where it points. Never raises: a URL it cannot read is masked whole."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return mask(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{port}" if port is not None else "")
    query = "&".join(_masked_parameter(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def _masked_parameter(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and _SECRET_PARAMETER.search(name):
        return f"{name}=***"
    return pair
