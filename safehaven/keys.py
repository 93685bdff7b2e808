"""The key ring: key files under ``keys/``, guarded before any use.

Rules (CoP 27b-c, BRIEF "Pseudonymisation and encryption"):

* Each key is 32 random bytes from the OS CSPRNG, held in its own file, mode 0600, owned by
  the running user, never behind a symbolic link. A key that is readable or writable by
  group or others, or a symlink, is refused: the haven will not start on it.
* A key is known by its *key id* (the first 16 hex digits of SHA-256 over the key): ids are
  recorded in metadata and audit entries; key material never is (no ``__repr__`` shows it).
* A missing key is created on first run, but never while data it protects already exists:
  losing the store key is reported, not papered over with a new key.

Key files: ``keys/<purpose>.key`` holds the current key as hex; ``keys/keyring.json`` (no
material) records ids, creation and retirement. Purposes used by the haven: ``store``
(encryption at rest of the DuckDB store), ``haven`` (HMAC pseudonyms), ``vault`` (identity
vault). Rotation and per-agreement keys are built on ``KeyRing.material`` / ``KeyRing.write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_BYTES = 32


class KeyRingError(Exception):
    """A key problem the operator must fix. The message never carries key material."""


@dataclass(frozen=True)
class Key:
    """Key material with an id; the material is hidden from repr and str."""

    purpose: str
    material: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.material)

    @property
    def hex(self) -> str:
        return self.material.hex()

    def __repr__(self) -> str:
        return f"Key(purpose={self.purpose!r}, key_id={self.key_id!r})"

    __str__ = __repr__


def key_id(material: bytes) -> str:
    """A public identifier for a key: SHA-256 over the material, first 16 hex digits."""
    return hashlib.sha256(b"safehaven-key-id:" + material).hexdigest()[:16]


def check_key_file(path: Path) -> None:
    """Refuse a key file that is a symlink, not a regular file, not ours, or not 0600-tight."""
    if path.is_symlink():
        raise KeyRingError(f"key file {path} is a symbolic link; replace it with a regular file")
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise KeyRingError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyRingError(
            f"key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise KeyRingError(f"key file {path} is owned by another user")


class KeyRing:
    """Key files in one directory, each checked before it is read."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, purpose: str) -> Path:
        if not purpose.replace("-", "").replace("_", "").isalnum():
            raise KeyRingError(f"invalid key purpose {purpose!r}")
        return self.directory / f"{purpose}.key"

    def exists(self, purpose: str) -> bool:
        path = self.path(purpose)
        return path.exists() or path.is_symlink()

    def get(self, purpose: str) -> Key:
        """Read a key, refusing unsafe files. Raises KeyRingError if it is missing."""
        path = self.path(purpose)
        if not path.exists() and not path.is_symlink():
            raise KeyRingError(f"key {purpose!r} is missing ({path})")
        self._check_directory()
        check_key_file(path)
        text = path.read_text().strip()
        try:
            material = bytes.fromhex(text)
        except ValueError:
            raise KeyRingError(f"key file {path} is not hex-encoded key material") from None
        if len(material) != KEY_BYTES:
            raise KeyRingError(f"key file {path} does not hold a {KEY_BYTES}-byte key")
        return Key(purpose, material)

    def get_or_create(self, purpose: str, *, allow_create: bool = True) -> Key:
        """The key for ``purpose``; created (0600) only when ``allow_create`` is true."""
        if self.exists(purpose):
            return self.get(purpose)
        if not allow_create:
            raise KeyRingError(
                f"key {purpose!r} is missing ({self.path(purpose)}) but data protected by it "
                "exists; restore the key file from the key custodian's backup"
            )
        return self.write(purpose, secrets.token_bytes(KEY_BYTES))

    def write(self, purpose: str, material: bytes, *, replace: bool = False) -> Key:
        """Write key material atomically with mode 0600 and record its id in keyring.json."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        path = self.path(purpose)
        if path.exists() and not replace:
            raise KeyRingError(f"key {purpose!r} already exists")
        tmp = path.with_suffix(".key.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(material.hex())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        key = Key(purpose, material)
        self._record(purpose, key.key_id)
        return key

    def destroy(self, purpose: str) -> str | None:
        """Overwrite and unlink a key file (crypto-shredding); returns the destroyed key id."""
        path = self.path(purpose)
        if not path.exists():
            return None
        kid = self.get(purpose).key_id
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write(secrets.token_bytes(size))
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        self._record(purpose, kid, destroyed=True)
        return kid

    def manifest(self) -> dict[str, dict[str, object]]:
        """Key ids and dates per purpose; never material."""
        path = self.directory / "keyring.json"
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    def _record(self, purpose: str, kid: str, *, destroyed: bool = False) -> None:
        data = self.manifest()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        entry = data.setdefault(purpose, {"current": None, "history": []})
        history = entry["history"]
        assert isinstance(history, list)
        if destroyed:
            for item in history:
                if item["key_id"] == kid:
                    item["destroyed_at"] = now
            entry["current"] = None
        else:
            for item in history:
                if item["key_id"] == entry["current"] and "retired_at" not in item:
                    item["retired_at"] = now
            history.append({"key_id": kid, "created_at": now})
            entry["current"] = kid
        tmp = self.directory / "keyring.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.directory / "keyring.json")

    def _check_directory(self) -> None:
        if self.directory.is_symlink():
            raise KeyRingError(f"key directory {self.directory} is a symbolic link")
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o022:
            raise KeyRingError(
                f"key directory {self.directory} is writable by group or others "
                f"(mode {mode:04o}); run: chmod 700 {self.directory}"
            )
