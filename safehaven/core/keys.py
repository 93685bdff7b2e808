"""The key ring: key files under ``keys/``, guarded before any use.

Rules (CoP 27b-c, ``docs/rules.md`` "Pseudonymisation and encryption"):

* Each key is 32 random bytes from the OS CSPRNG, held in its own file, mode 0600, owned by
  the running user, never behind a symbolic link. A key that is readable or writable by
  group or others, or a symlink, is refused: the haven will not start on it.
* A key is known by its *key id* (the first 16 hex digits of SHA-256 over the key): ids are
  recorded in metadata and audit entries; key material never is (no ``__repr__`` shows it).
* A missing key is created on first run, but never while data it protects already exists:
  losing the store key is reported, not papered over with a new key.

Key files: ``keys/<purpose>.key`` holds the current key as hex; ``keys/keyring.json`` (no
material) records ids, creation, retirement and destruction. Purposes used by the haven:

* ``store``: encryption at rest of the DuckDB store (``safehaven.core.store``).
* ``haven``: the HMAC key of haven pseudonyms (``safehaven.protect.pseudonymise``).
* ``audit``: the audit chain's MAC key (``safehaven.core.audit``).
* ``vault``: an X25519 key *pair* for the identity vault (``safehaven.protect.vault``). Role
  separation: the pipeline needs only the public half ``keys/vault.pub`` to write vault
  entries (envelope encryption); the private half ``keys/vault.key`` belongs to the
  governance lead and is read only by re-identification and haven-key rotation, so it can be
  kept off the pipeline host. The pair is known by the id of its public half. A public key
  file is not secret but its integrity matters (a substituted one would encrypt identities to
  someone else), so it is held to the same rules except that others may read it.
* ``agreement-<id>``: a random 32-byte salt per data sharing agreement. The agreement's
  pseudonym key is HKDF-SHA256 (RFC 5869) over the haven key with that salt and
  ``info = b"safehaven agreement pseudonym v1|" + id`` (``agreement_key``): two recipients'
  extracts cannot be joined, and destroying the salt file crypto-shreds the agreement's
  pseudonym domain without touching any other (CoP 43d, 48-50).

Rotation (``safehaven.protect.rotation``) replaces a purpose's file atomically; the manifest marks the
previous id retired, so every id that ever protected data stays on record.

A key file that is replaced or discarded is **shredded**, not just unlinked (CoP 48-50;
``docs/rules.md`` "Disposal": crypto-shredding is only as good as the destruction of the key). A rename
over a file frees its blocks with the old key still in them, so ``write`` first keeps a
second name for the old file (``<name>.retired``, a hard link), renames the new key into
place, then overwrites the old file through that name and unlinks it
(``safehaven.core.files.shred_file``). The key file is never absent or partial at any moment; a
crash between the steps leaves a ``.retired`` file that the next write of that key, or
``safehaven keys rotate --resume``, shreds (or just unlinks, when it is still the live file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehaven.core.files import shred_file

KEY_BYTES = 32
AGREEMENT_INFO = b"safehaven agreement pseudonym v1|"
VAULT = "vault"
_AGREEMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


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


def x25519_private() -> bytes:
    """A fresh X25519 private key, raw 32 bytes (the private half of a vault key pair)."""
    return X25519PrivateKey.generate().private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


def x25519_public(private_bytes: bytes) -> bytes:
    """The raw public half of a raw X25519 private key (the one place it is derived)."""
    return (
        X25519PrivateKey.from_private_bytes(private_bytes)
        .public_key()
        .public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    )


def check_key_file(path: Path, *, public: bool = False) -> None:
    """Refuse a key file that is a symlink, not a regular file, not ours, or not 0600-tight.

    A ``public`` key file may be readable by others, never writable by them.
    """
    if path.is_symlink():
        raise KeyRingError(f"key file {path} is a symbolic link; replace it with a regular file")
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise KeyRingError(f"key file {path} is not a regular file")
    if public and st.st_mode & 0o022:
        raise KeyRingError(
            f"public key file {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 644 {path}"
        )
    if not public and st.st_mode & 0o077:
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

    def write(self, purpose: str, material: bytes, *, replace: bool = False, record: bool = True) -> Key:
        """Write key material atomically with mode 0600 and record its id in keyring.json.

        ``record=False`` for staging files (a rotation in progress) and for the halves of a
        key pair, which is recorded once under the id of its public half.
        """
        path = self.path(purpose)
        if path.exists() and not replace:
            raise KeyRingError(f"key {purpose!r} already exists")
        self._write_file(path, material, 0o600)
        key = Key(purpose, material)
        if record:
            self._record(purpose, key.key_id)
        return key

    def _write_file(self, path: Path, material: bytes, mode: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(material.hex())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        retired = _retired(path)
        _shred_leftover(retired, path)
        if path.exists() and not path.is_symlink():
            try:
                os.link(path, retired, follow_symlinks=False)
            except OSError:
                pass  # no hard links on this file system: the old file is replaced by rename only
        os.replace(tmp, path)
        _shred_leftover(retired, path)

    def shreds_replaced_keys(self) -> bool:
        """Whether a replaced key file is overwritten here (the key directory allows hard links)."""
        probe = self.directory / ".link-probe"
        other = self.directory / ".link-probe.2"
        for p in (probe, other):
            p.unlink(missing_ok=True)
        probe.touch(mode=0o600)
        try:
            os.link(probe, other)
            return True
        except OSError:
            return False
        finally:
            for p in (probe, other):
                p.unlink(missing_ok=True)

    def discard(self, purpose: str, *, public: bool = False) -> None:
        """Shred a key file that is no longer needed (a staged or spent key); no-op when absent."""
        path = self.public_path(purpose) if public else self.path(purpose)
        if path.exists() or path.is_symlink():
            shred_file(path)

    def shred_leftovers(self) -> list[str]:
        """Shred the ``.retired`` files an interrupted replacement left; returns their names."""
        done = []
        for retired in sorted(self.directory.glob("*.retired")) if self.directory.is_dir() else []:
            _shred_leftover(retired, retired.with_name(retired.name[: -len(".retired")]))
            done.append(retired.name)
        return done

    # --- public halves of key pairs ---------------------------------------------------

    def public_path(self, purpose: str) -> Path:
        return self.path(purpose).with_suffix(".pub")

    def get_public(self, purpose: str) -> Key:
        """Read a public key (``<purpose>.pub``), refusing a file others could have replaced."""
        path = self.public_path(purpose)
        if not path.exists() and not path.is_symlink():
            raise KeyRingError(f"public key {purpose!r} is missing ({path})")
        self._check_directory()
        check_key_file(path, public=True)
        try:
            material = bytes.fromhex(path.read_text().strip())
        except ValueError:
            raise KeyRingError(f"public key file {path} is not hex-encoded") from None
        if len(material) != KEY_BYTES:
            raise KeyRingError(f"public key file {path} does not hold a {KEY_BYTES}-byte key")
        return Key(purpose + ".pub", material)

    def create_keypair(self, purpose: str = VAULT) -> Key:
        """Create an X25519 key pair: private ``<purpose>.key`` (0600), public ``<purpose>.pub`` (0644).

        Never over an existing pair (rotation replaces one with ``write_keypair``). Returns the
        public key; the manifest records the pair under the public key's id.
        """
        if self.exists(purpose) or self.public_path(purpose).exists():
            raise KeyRingError(f"key pair {purpose!r} already exists")
        return self.write_keypair(purpose, x25519_private())

    def write_keypair(self, purpose: str, private_bytes: bytes) -> Key:
        """Write an X25519 private key and its public half, replacing any pair; returns the public key."""
        pub = x25519_public(private_bytes)
        self.write(purpose, private_bytes, replace=True, record=False)
        self._write_file(self.public_path(purpose), pub, 0o644)
        self._record(purpose, key_id(pub))
        return Key(purpose + ".pub", pub)

    def public_or_create(self, purpose: str = VAULT) -> Key:
        """The public half of a key pair, creating the pair on first use only."""
        if self.public_path(purpose).exists() or self.public_path(purpose).is_symlink():
            return self.get_public(purpose)
        if self.exists(purpose):
            raise KeyRingError(
                f"the public key {self.public_path(purpose)} is missing but its private key exists; "
                "restore the public key file (or derive it from the private key with the key custodian)"
            )
        return self.create_keypair(purpose)

    def destroy(self, purpose: str) -> str | None:
        """Overwrite and unlink a key file (crypto-shredding); returns the destroyed key id."""
        path = self.path(purpose)
        if not path.exists():
            return None
        kid = self.get(purpose).key_id
        public = self.public_path(purpose)
        if public.exists() and not public.is_symlink():
            kid = key_id(self.get_public(purpose).material)  # a pair is known by its public half
            public.unlink()
        shred_file(path)
        self._record(purpose, kid, destroyed=True)
        return kid

    def retired_ids(self, purpose: str) -> list[str]:
        """Ids of earlier keys of ``purpose`` that were replaced (rotated out)."""
        entry = self.manifest().get(purpose, {})
        history = entry.get("history", []) if isinstance(entry, dict) else []
        return [h["key_id"] for h in history if "retired_at" in h]  # type: ignore[index]

    def current_id(self, purpose: str) -> str | None:
        entry = self.manifest().get(purpose)
        return entry.get("current") if isinstance(entry, dict) else None  # type: ignore[return-value]

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


def _retired(path: Path) -> Path:
    return path.with_name(path.name + ".retired")


def _shred_leftover(retired: Path, live: Path) -> None:
    """Remove ``retired``: shredded when it is an old key, only unlinked when it still names the
    live file (a crash before the rename: shredding it would destroy the current key)."""
    if not retired.exists() and not retired.is_symlink():
        return
    if live.exists() and not retired.is_symlink() and os.path.samefile(retired, live):
        retired.unlink()
    else:
        shred_file(retired)


def check_agreement_id(agreement_id: str) -> str:
    """An agreement id usable in key file names and paths: letters, digits, '-' and '_'."""
    if not _AGREEMENT_ID.fullmatch(agreement_id or ""):
        raise KeyRingError(f"agreement id {agreement_id!r} must be 1-64 letters, digits, '-' or '_'")
    return agreement_id


def agreement_purpose(agreement_id: str) -> str:
    return f"agreement-{check_agreement_id(agreement_id)}"


def agreement_key(keyring: KeyRing, agreement_id: str, *, create: bool = True) -> Key:
    """The pseudonym key of one agreement's domain (rule in the module docstring).

    HKDF-SHA256(ikm = haven key, salt = ``keys/agreement-<id>.key``,
    info = ``b"safehaven agreement pseudonym v1|" + id``). The salt is created on first use
    when ``create``; once destroyed (crypto-shredding) the key cannot be derived again, and a
    call with ``create=False`` says so rather than starting a new domain silently.
    """
    purpose = agreement_purpose(agreement_id)
    if not keyring.exists(purpose):
        if not create:
            raise KeyRingError(
                f"agreement {agreement_id!r} has no pseudonym key ({keyring.path(purpose)}): "
                "never created, or destroyed at disposal"
            )
        keyring.write(purpose, secrets.token_bytes(KEY_BYTES))
    return derive_agreement_key(keyring.get("haven").material, keyring.get(purpose).material, agreement_id)


def derive_agreement_key(haven_material: bytes, salt: bytes, agreement_id: str) -> Key:
    """HKDF-SHA256(ikm = haven key, salt = agreement salt, info = ... | id): the agreement's key."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=AGREEMENT_INFO + agreement_id.encode()
    ).derive(haven_material)
    return Key(agreement_purpose(agreement_id), derived)


def agreement_ids(keyring: KeyRing) -> list[str]:
    """Agreements that have a pseudonym salt on this key ring."""
    if not keyring.directory.exists():
        return []
    return sorted(p.stem[len("agreement-") :] for p in keyring.directory.glob("agreement-*.key"))


def destroy_agreement_key(keyring: KeyRing, agreement_id: str) -> str | None:
    """Crypto-shred an agreement's pseudonym domain: overwrite and remove its salt file."""
    return keyring.destroy(agreement_purpose(agreement_id))
