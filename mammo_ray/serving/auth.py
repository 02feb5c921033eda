"""API keys for the served ensemble: bearer tokens read from a file, kept hashed, compared in constant time.

A key file holds one key per line (blank lines and ``#`` comments are skipped), so a Kubernetes Secret
mounted as a file is one, and several keys can be valid at once while one is rotated out. The file is
named by ``mammo-ray serve --api-keys FILE`` (``ServeSettings.api_keys_file``) or by
``$MAMMO_RAY_API_KEYS_FILE``, which the Serve app also reads under ``serve run`` / ``serve deploy``.

Only SHA-256 digests of the keys stay in memory. A presented key is hashed and compared with every
digest by ``hmac.compare_digest``, all of them each time, so neither the comparison nor the number of
keys tried leaks where a guess went wrong. A refusal never repeats the key it was given.

Safe by default: ``check_bind`` refuses to serve on an address other than loopback without keys,
unless ``insecure_no_auth`` says so explicitly (and then a warning is logged at every start).
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KEYS_ENV = "MAMMO_RAY_API_KEYS_FILE"
MIN_KEY_CHARS = 16  # shorter keys are guessable: refuse them when the file is read
OPEN_PATHS = frozenset({"/v1/health"})  # Kubernetes' probes call it without a key


class AuthConfigError(ValueError):
    """The key file cannot be used, or the bind address needs keys: names the file or address and the fix."""


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe): what ``mammo-ray api-key`` adds."""
    return secrets.token_urlsafe(32)


def append_key(path: str | Path) -> tuple[str, int]:
    """Add a new key to the key file ``path`` (created readable by its owner only): (the key, keys now)."""
    path = Path(path)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.write(key + "\n")
    return key, len(ApiKeys.from_file(path))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The SHA-256 digests of the valid keys, and the file they came from (for messages)."""

    digests: tuple[bytes, ...]
    source: str

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """Read a key file.

        Raises:
            AuthConfigError: the file cannot be read, holds no key, or holds a key shorter than
                ``MIN_KEY_CHARS`` (named by its line number, never by its value).
        """
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"API key file {path}: cannot be read ({type(exc).__name__})") from None
        digests = []
        for number, line in enumerate(lines, start=1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            if len(key) < MIN_KEY_CHARS:
                raise AuthConfigError(
                    f"API key file {path}, line {number}: a key of {len(key)} characters is too short "
                    f"(at least {MIN_KEY_CHARS}; `mammo-ray api-key --append {path}` adds a random one)"
                )
            if len(key.split()) > 1:
                raise AuthConfigError(f"API key file {path}, line {number}: a key holds whitespace (one key per line)")
            digests.append(_digest(key))
        if not digests:
            raise AuthConfigError(
                f"API key file {path} holds no key (one per line; `mammo-ray api-key --append {path}` adds one)"
            )
        return cls(tuple(digests), str(path))

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is one of the valid keys; every digest is compared, in constant time each."""
        if not key:
            return False
        presented = _digest(key)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def __len__(self) -> int:
        return len(self.digests)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def load_keys(api_keys_file: str | None) -> ApiKeys | None:
    """The keys of ``api_keys_file``, else of ``$MAMMO_RAY_API_KEYS_FILE``; None when neither is set."""
    path = api_keys_file or os.environ.get(KEYS_ENV) or None
    return ApiKeys.from_file(path) if path else None


def own_key(api_keys_file: str | None) -> str | None:
    """The first key of the key file (or of ``$MAMMO_RAY_API_KEYS_FILE``): what ``mammo-ray serve`` sends
    when it asks its own app for the model's description. None without a file."""
    path = api_keys_file or os.environ.get(KEYS_ENV) or None
    if not path:
        return None
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return next((key for key in lines if key and not key.startswith("#")), None)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, keys: ApiKeys | None, insecure_no_auth: bool) -> None:
    """Refuse to serve on ``host`` beyond loopback without keys, unless ``insecure_no_auth``.

    Raises:
        AuthConfigError: naming the address and the two ways forward.
    """
    if keys is not None or is_loopback(host):
        return
    if insecure_no_auth:
        log.warning(
            "serving on %s WITHOUT authentication (insecure_no_auth): anyone who reaches this address can "
            "send images to the model and read its answers",
            host,
        )
        return
    raise AuthConfigError(
        f"refusing to serve on {host} without API keys: anyone who reaches that address could call the model. "
        f"Make a key file (`mammo-ray api-key --append keys.txt`) and pass it with --api-keys keys.txt "
        f"(or set ${KEYS_ENV}), bind 127.0.0.1, or pass --insecure-no-auth to accept the risk"
    )
