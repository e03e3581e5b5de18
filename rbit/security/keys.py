"""Ed25519 key files and the directory of trusted public keys.

Private keys are PKCS#8 PEM files (mode 0600); public keys are SubjectPublicKeyInfo PEM
files ending in ``.pub``. A key's id is its fingerprint: ``ed25519:`` and the first 32
hex digits of the SHA-256 of the 32 raw public key bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rbit.errors import ConfigError, RbitError

log = logging.getLogger(__name__)

#: Suffix of public key files in a trusted-keys directory.
PUBLIC_SUFFIX = ".pub"
#: Suffix of private key files written by :func:`generate`.
PRIVATE_SUFFIX = ".key"
#: How often, at most, a trusted-keys directory is checked for changes (seconds).
RESCAN_INTERVAL = 1.0
_MAX_KEY_FILE = 16 * 1024


class KeyFileError(RbitError):
    """A key file cannot be read or is not an Ed25519 key."""


def fingerprint(public: Ed25519PublicKey) -> str:
    """The key id of ``public``: ``ed25519:`` + 32 hex digits of SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def generate(name: str, out: str | Path) -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` (0600) and ``NAME.pub`` into ``out``.

    Raises:
        FileExistsError: Either file exists (nothing is overwritten).
        ValueError: ``name`` is not a plain file name.
    """
    if not name or "/" in name or name.startswith(".") or "\x00" in name:
        raise ValueError(f"key name {name!r} must be a plain file name")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: a file that appeared meanwhile is never overwritten either.
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _read(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a key")
    return data


def load_private(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (unencrypted).

    Raises:
        KeyFileError: Unreadable, not PEM, encrypted, or not Ed25519.
    """
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (a private key file gives its public half).

    Raises:
        KeyFileError: Unreadable, not PEM, or not Ed25519.
    """
    data = _read(path)
    if b"PRIVATE KEY" in data:
        return load_private(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def signing_key(path: str, *, file: str, section: str = "security",
                key: str = "signing_key") -> Ed25519PrivateKey:
    """Load the configured signing key, or fail naming file, section and key."""
    try:
        return load_private(path)
    except KeyFileError as exc:
        raise ConfigError(str(exc), file=file, section=section, key=key) from exc


class TrustedKeys:
    """The public keys in a directory, re-read when it changes.

    Every ``*.pub`` file is a trusted key; removing one revokes it. The directory is
    looked at again at most once per :data:`RESCAN_INTERVAL` seconds (a listing and a
    stat per file), and re-read only when a name, size or mtime changed.

    Args:
        directory: The trusted-keys directory.
        clock: Monotonic clock (injected by tests).
    """

    def __init__(self, directory: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.problems: list[str] = []
        self.refresh(force=True)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        """The trusted key with id ``key_id``, or None."""
        self.refresh()
        return self._keys.get(key_id)

    def ids(self) -> list[str]:
        """The ids of the keys trusted now."""
        self.refresh()
        return sorted(self._keys)

    def refresh(self, force: bool = False) -> None:
        """Re-read the directory if it changed (at most once a second unless forced)."""
        now = self._clock()
        if not force and now - self._checked < RESCAN_INTERVAL:
            return
        with self._lock:
            self._checked = now
            stamp = self._scan_stamp()
            if stamp == self._stamp and not force:
                return
            keys, problems = self._load(stamp)
            if self._stamp is not None and set(keys) != set(self._keys):
                log.warning("trusted keys in %s now: %s", self.directory,
                            ", ".join(sorted(keys)) or "none")
            self._keys, self.problems, self._stamp = keys, problems, stamp

    def _scan_stamp(self) -> tuple:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError as exc:
            return (("error", str(exc)),)
        stamp = []
        for entry in entries:
            if entry.name.endswith(PUBLIC_SUFFIX):
                try:
                    info = entry.stat()
                except OSError:
                    continue
                stamp.append((entry.name, info.st_size, info.st_mtime_ns))
        return tuple(stamp)

    def _load(self, stamp: tuple) -> tuple[dict[str, Ed25519PublicKey], list[str]]:
        keys: dict[str, Ed25519PublicKey] = {}
        problems: list[str] = []
        if stamp and stamp[0][0] == "error":
            return keys, [f"cannot list {self.directory}: {stamp[0][1]}"]
        for name, _size, _mtime in stamp:
            try:
                key = load_public(os.path.join(self.directory, name))
            except KeyFileError as exc:
                problems.append(str(exc))
                continue
            keys[fingerprint(key)] = key
        for problem in problems:
            log.warning("trusted keys: %s (ignored)", problem)
        return keys, problems


def trusted_keys(directory: str | None, *, file: str, section: str = "security",
                 key: str = "trusted_keys") -> TrustedKeys:
    """The configured trusted keys, or fail naming file, section and key.

    Raises:
        ConfigError: No directory is set, it cannot be read, or it holds no usable key.
    """
    if not directory:
        raise ConfigError("require_signed is on but no trusted_keys directory is set",
                          file=file, section=section, key=key)
    keys = TrustedKeys(directory)
    if not keys.ids():
        detail = "; ".join(keys.problems) or f"no *{PUBLIC_SUFFIX} file"
        raise ConfigError(f"no usable trusted key in {directory}: {detail}",
                          file=file, section=section, key=key)
    return keys
