"""The API token: where it comes from, and who may go without one.

Order: ``$ARTIFEX_API_TOKEN``, else ``--token-file``, else ``<data dir>/api_token``, which
is generated (mode 0600) and printed on the first start. ``--no-auth`` is refused unless
the server listens on a loopback address only.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from artifex.env import read_env
from artifex.errors import InvalidRequestError

TOKEN_FILE_NAME = "api_token"
_MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_no_auth(host: str) -> None:
    if not is_loopback(host):
        raise InvalidRequestError("no_auth", f"--no-auth is only allowed on a loopback address, not {host!r}",
                                  "127.0.0.1, ::1, localhost")


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise InvalidRequestError("token_file", f"{path} does not exist") from None
    if len(token) < _MIN_TOKEN_CHARS:
        raise InvalidRequestError("token_file", f"the token in {path} is too short",
                                  f"at least {_MIN_TOKEN_CHARS} characters")
    return token


def resolve_token(data_dir: Path, token_file: Path | None, announce=None) -> tuple[str, str]:
    """(token, where it came from). Generates and stores one on the first start when none is configured."""
    env_token = read_env().api_token
    if env_token:
        if len(env_token) < _MIN_TOKEN_CHARS:
            raise InvalidRequestError("ARTIFEX_API_TOKEN", "too short", f"at least {_MIN_TOKEN_CHARS} characters")
        return env_token, "ARTIFEX_API_TOKEN"
    if token_file is not None:
        return _read_token(token_file), str(token_file)
    path = data_dir / TOKEN_FILE_NAME
    if path.exists():
        return _read_token(path), str(path)
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    (announce or _print)(f"artifex serve: generated an API token, stored in {path} (mode 600). "
                         f"Send it as 'Authorization: Bearer <token>':\n{token}")
    return token, str(path)


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer ...`` header."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
