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
  separation, enforced (NIST SP 800-57 Part 2 key custodian role; CoP 27b): the pipeline holds
  only the public half ``keys/vault.pub`` and can add vault entries but never read one back.
  The private half ``keys/vault.key`` never rests unencrypted where the pipeline runs: it is
  *sealed*, a PKCS#8 ``ENCRYPTED PRIVATE KEY`` (PBES2 with the scrypt KDF, RFC 7914 section 7,
  and AES-256-CBC, RFC 8018) under the key custodian's passphrase, and opened only through a
  :class:`Custodian` that the command line builds for custodian commands (re-identification,
  subject access, identifiable releases, rotation). :meth:`KeyRing.check_custody` refuses a
  key directory holding an unsealed private key, so the pipeline will not start on one. The
  pair is known by the id of its public half. A public key file is not secret but its
  integrity matters (a substituted one would encrypt identities to someone else), so it is
  held to the same rules except that others may read it, and it is pinned like every key.
* ``agreement-<id>``: a random 32-byte salt per data sharing agreement. The agreement's
  pseudonym key is HKDF-SHA256 (RFC 5869) over the haven key with that salt and
  ``info = b"safehaven agreement pseudonym v1|" + id`` (``agreement_key``): two recipients'
  extracts cannot be joined, and destroying the salt file crypto-shreds the agreement's
  pseudonym domain without touching any other (CoP 43d, 48-50).

**Every key is pinned** (CoP 27b-c): ``keyring.json`` records the current id of each purpose,
and :meth:`KeyRing.get` / :meth:`KeyRing.get_public` / :meth:`KeyRing.get_private` refuse a key
file whose id is not the recorded one (swapped or substituted), naming the id expected, and a
key file of which the ring has no note at all (``keyring.json`` deleted or emptied beside the
key files; staged keys excepted, :data:`STAGEABLE`): every key, a new purpose's too, is noted
before its file is written (under :data:`MANIFEST_LOCK`, so two processes never lose a note), and
a first key whose record a crash cut off is recorded at its next read. The way back from a lost
record is the key custodian's ``safehaven keys recover-record``
(``safehaven.protect.key_record``): each key file is checked against the store (the
store key by opening it, every other key by its epoch) and recorded again, audited. A key
with a record is never re-created when its file is missing: the message asks for the
custodian's backup. The store pins the same ids again in ``governance.key_epochs``
(``safehaven.core.pins``), so editing ``keyring.json`` alongside a key file does not get past it.
The vault public key is pinned a third time, by the audit trail (``safehaven.core.pins.check_vault_audited``):
the store key can rewrite the store's epoch, but not an authentic audit entry naming the key.
``keyring.json`` notes an id as ``pending`` before a key file is replaced, so a crash between
the file and the record leaves both ids acceptable until the next write finishes.

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

import base64
import fcntl
import hashlib
import itertools
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from safehaven.core.files import shred_file

KEY_BYTES = 32
AGREEMENT_INFO = b"safehaven agreement pseudonym v1|"
VAULT = "vault"
#: Purposes held as an X25519 pair whose private half is sealed under the custodian passphrase.
PAIRS = (VAULT,)
STAGED_SUFFIX = "-next"
#: Purposes staged as ``<purpose>-next`` (unrecorded until installed): a rotation's new store, haven
#: or vault key, and a new audit trail's key. Only these names are staged; an agreement whose id
#: ends in ``-next`` is an agreement, not a stage (found by review).
STAGEABLE = ("store", "haven", "audit", VAULT)
MANIFEST = "keyring.json"
#: Held exclusively around each read-modify-write of ``keyring.json`` (two processes each adding a
#: note must not lose one: a key file with no note is refused).
MANIFEST_LOCK = ".keyring.lock"
#: What a ``keyring.json`` that cannot be read as a record asks of the key custodian.
_DAMAGED = (
    "the key custodian runs `safehaven keys recover-record`, which keeps it as keyring.json.damaged-<time> "
    "and records the key files again, each checked against the store"
)
#: Held exclusively by :meth:`KeyRing.get_or_create` from its check that a key is missing to its
#: write, so processes creating the same key at once make one (found by review: each made its own).
CREATE_LOCK = ".create.lock"
#: The key custodian's command that records again the key files a lost ``keyring.json`` noted.
RECOVER_COMMAND = "safehaven keys recover-record"
_AGREEMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

#: scrypt work factor for sealing (RFC 7914; OWASP's minimum for scrypt is N=2^17, r=8, p=1).
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
SEAL_SALT_BYTES = 16
SEALED_LABEL = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
UNSEALED_LABEL = b"-----BEGIN PRIVATE KEY-----"
# DER of the object identifiers of PKCS#8 PBES2 (RFC 8018), scrypt (RFC 7914) and AES-256-CBC
_OID_PBES2 = bytes.fromhex("06092a864886f70d01050d")
_OID_SCRYPT = bytes.fromhex("06092b06010401da47040b")
_OID_AES256_CBC = bytes.fromhex("060960864801650304012a")


class KeyRingError(Exception):
    """A key problem the operator must fix. The message never carries key material."""


class KeySubstituted(KeyRingError):
    """A key file holds a key other than the one the key ring records (swapped or substituted)."""

    def __init__(self, message: str, *, path: Path, found: str, recorded: str) -> None:
        super().__init__(message)
        self.path, self.found, self.recorded = path, found, recorded


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


class Custodian:
    """The key custodian's passphrase (NIST SP 800-57 Part 2: the custodian role), asked for once,
    when a sealed key is first opened or sealed, and never shown by ``repr`` or ``str``.

    ``ask`` returns the passphrase (the command line prompts, or reads an environment variable
    for automation). ``scrypt_n`` is the scrypt work factor of keys this custodian seals.
    """

    def __init__(self, ask: Callable[[], str | bytes], *, scrypt_n: int = SCRYPT_N) -> None:
        self._ask = ask
        self._value: bytes | None = None
        self.scrypt_n = scrypt_n

    @classmethod
    def of(cls, passphrase: str | bytes, *, scrypt_n: int = SCRYPT_N) -> Custodian:
        return cls(lambda: passphrase, scrypt_n=scrypt_n)

    def passphrase(self) -> bytes:
        if self._value is None:
            value = self._ask()
            value = value.encode() if isinstance(value, str) else value
            if not value:
                raise KeyRingError("the custodian passphrase is empty")
            self._value = value
        return self._value

    def __repr__(self) -> str:
        return "Custodian(<passphrase hidden>)"

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


# --- sealing private keys (PKCS#8 EncryptedPrivateKeyInfo, PBES2 + scrypt + AES-256-CBC) -----


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def seal_private(private_bytes: bytes, passphrase: bytes, *, n: int = SCRYPT_N) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY`` of a raw X25519 private key under ``passphrase``.

    PKCS#8 EncryptedPrivateKeyInfo with PBES2 (RFC 8018): key derivation scrypt (RFC 7914
    section 7; N=``n``, r=8, p=1, 16-byte random salt), encryption AES-256-CBC. The
    ``cryptography`` library's ``BestAvailableEncryption`` uses PBKDF2 with a low iteration
    count, so the structure is written here; it opens with
    ``cryptography``'s ``load_pem_private_key`` (see :func:`open_sealed`).
    """
    inner = X25519PrivateKey.from_private_bytes(private_bytes).private_bytes(
        ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption()
    )
    salt, iv = os.urandom(SEAL_SALT_BYTES), os.urandom(16)
    kek = Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(inner) + padder.finalize()
    enc = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padded) + enc.finalize()
    scrypt_params = _seq(_der(0x04, salt), _der_int(n), _der_int(SCRYPT_R), _der_int(SCRYPT_P), _der_int(32))
    pbes2 = _seq(_seq(_OID_SCRYPT, scrypt_params), _seq(_OID_AES256_CBC, _der(0x04, iv)))
    der = _seq(_seq(_OID_PBES2, pbes2), _der(0x04, ciphertext))
    return _pem(der)


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return SEALED_LABEL + b"\n" + b"\n".join(lines) + b"\n-----END ENCRYPTED PRIVATE KEY-----\n"


def open_sealed(pem: bytes, passphrase: bytes, where: Path) -> bytes:
    """The raw X25519 private key of a sealed PEM; a wrong passphrase is refused by name of file."""
    try:
        key = ser.load_pem_private_key(pem, passphrase)
    except (ValueError, TypeError):
        raise KeyRingError(
            f"the custodian passphrase does not open {where}; give the key custodian's passphrase "
            "(prompt, or SAFEHAVEN_CUSTODIAN_PASSPHRASE)"
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyRingError(f"{where} does not hold an X25519 private key")
    return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


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


def staged(purpose: str) -> str:
    """The name a rotation stages a new key of ``purpose`` under (not yet current)."""
    return purpose + STAGED_SUFFIX


def is_purpose(purpose: str) -> bool:
    """Whether ``purpose`` is one the haven keeps a key for: :data:`STAGEABLE`, or an agreement's."""
    if purpose in STAGEABLE:
        return True
    agreement = purpose.removeprefix(AGREEMENT_PREFIX)
    return agreement != purpose and _AGREEMENT_ID.fullmatch(agreement) is not None


def is_staged(purpose: str) -> bool:
    """Whether ``purpose`` names a staged key (:data:`STAGEABLE`), which is recorded only when installed."""
    return purpose in {staged(p) for p in STAGEABLE}


def hex_key(path: Path) -> bytes | None:
    """The 32 bytes a hex key file holds, or None when it holds something else."""
    try:
        material = bytes.fromhex(path.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        return None
    return material if len(material) == KEY_BYTES else None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object with no name twice (``json`` would keep the last silently)."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("a name appears twice")
    return dict(pairs)


def _manifest_shape(data: object) -> str | None:
    """What is wrong with the shape of a parsed ``keyring.json``, or None (:meth:`KeyRing.manifest`)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for purpose, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("history"), list):
            return f"{purpose!r} has no history list"
        if not (entry.get("current") is None or isinstance(entry.get("current"), str)):
            return f"{purpose!r} has a current key id that is not text"
        if not all(isinstance(item, dict) and isinstance(item.get("key_id"), str) for item in entry["history"]):
            return f"{purpose!r} has a history entry without a key id"
    return None


class KeyRing:
    """Key files in one directory, each checked (and pinned) before it is read.

    ``custodian`` is given only by custodian commands: without it a sealed private key cannot
    be opened, so the pipeline (which is never given one) cannot read the identity vault.
    """

    def __init__(self, directory: Path, custodian: Custodian | None = None) -> None:
        self.directory = directory
        self.custodian = custodian

    def __repr__(self) -> str:
        return f"KeyRing({str(self.directory)!r}, custodian={'yes' if self.custodian else 'no'})"

    def path(self, purpose: str) -> Path:
        if not purpose.replace("-", "").replace("_", "").isalnum():
            raise KeyRingError(f"invalid key purpose {purpose!r}")
        return self.directory / f"{purpose}.key"

    def exists(self, purpose: str) -> bool:
        path = self.path(purpose)
        return path.exists() or path.is_symlink()

    def get(self, purpose: str) -> Key:
        """Read a symmetric key, refusing unsafe files and keys other than the recorded one."""
        path = self.path(purpose)
        if purpose.removesuffix(STAGED_SUFFIX) in PAIRS:
            raise KeyRingError(f"{path} is a sealed private key: only the key custodian opens it")
        if not path.exists() and not path.is_symlink():
            expected = self.current_id(purpose)
            hint = f" (key {expected}); restore it from the key custodian's backup" if expected else ""
            raise KeyRingError(f"key {purpose!r} is missing ({path}){hint}")
        self._check_directory()
        check_key_file(path)
        material = hex_key(path)
        if material is None:
            raise KeyRingError(f"key file {path} does not hold a hex-encoded {KEY_BYTES}-byte key")
        key = Key(purpose, material)
        self._check_pinned(purpose, key.key_id, path)
        return key

    def get_or_create(self, purpose: str, *, allow_create: bool = True) -> Key:
        """The key for ``purpose``; created (0600) only when ``allow_create`` is true and the
        key ring has never recorded one (a recorded key that is missing is never re-created)."""
        if self.exists(purpose):
            return self.get(purpose)
        with self._locked(CREATE_LOCK):  # two processes creating one purpose make one key, not two
            if self.exists(purpose):
                return self.get(purpose)
            if not allow_create or self.recorded(purpose):
                expected = self.current_id(purpose) or "recorded in keyring.json"
                raise KeyRingError(
                    f"key {purpose!r} (key {expected}) is missing ({self.path(purpose)}) but data protected by it "
                    "exists; restore the key file from the key custodian's backup"
                )
            return self.write(purpose, secrets.token_bytes(KEY_BYTES))

    def write(self, purpose: str, material: bytes, *, replace: bool = False, record: bool = True) -> Key:
        """Write key material atomically with mode 0600 and record its id in keyring.json.

        ``record=False`` for staging files (a rotation in progress). The id is noted as pending
        before the file is replaced, so a crash in between leaves a key the ring accepts.
        """
        path = self.path(purpose)
        if path.exists() and not replace:
            raise KeyRingError(f"key {purpose!r} already exists")
        key = Key(purpose, material)
        if record:
            self._mark_pending(purpose, key.key_id)
        self._write_file(path, material.hex().encode(), 0o600)
        if record:
            self._record(purpose, key.key_id)
        return key

    def _write_file(self, path: Path, data: bytes, mode: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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

    # --- key pairs: public half in the clear, private half sealed ------------------------

    def public_path(self, purpose: str) -> Path:
        return self.path(purpose).with_suffix(".pub")

    def get_public(self, purpose: str) -> Key:
        """Read a public key (``<purpose>.pub``), refusing a file others could have replaced
        and a key other than the one the key ring records (a substituted public key)."""
        path = self.public_path(purpose)
        if not path.exists() and not path.is_symlink():
            expected = self.current_id(purpose)
            hint = f" (key {expected}); restore it from the key custodian's backup" if expected else ""
            raise KeyRingError(f"public key {purpose!r} is missing ({path}){hint}")
        self._check_directory()
        check_key_file(path, public=True)
        material = hex_key(path)
        if material is None:
            raise KeyRingError(f"public key file {path} does not hold a hex-encoded {KEY_BYTES}-byte key")
        self._check_pinned(purpose, key_id(material), path)
        return Key(purpose + ".pub", material)

    def get_private(self, purpose: str = VAULT) -> Key:
        """The private half of a key pair, opened with the custodian's passphrase.

        Refused without a custodian, when the file is not sealed, and when the key it holds is
        not the pair the key ring records (a substituted private key).
        """
        path = self.path(purpose)
        if self.custodian is None:
            raise KeyRingError(
                f"the private key {path} is sealed for the key custodian; run this as the custodian "
                "(the command asks for the passphrase)"
            )
        if not path.exists() and not path.is_symlink():
            raise KeyRingError(f"the private key {path} is not on this host; restore it from the custodian's backup")
        self._check_directory()
        check_key_file(path)
        pem = path.read_bytes()
        if not pem.startswith(SEALED_LABEL):
            raise KeyRingError(f"{path} is not sealed; the custodian seals it with `safehaven keys seal-vault`")
        private = open_sealed(pem, self.custodian.passphrase(), path)
        self._check_pinned(purpose, key_id(x25519_public(private)), path)
        return Key(purpose, private)

    def seal_keypair(self, purpose: str, private_bytes: bytes, *, stage: bool = False) -> Key:
        """Write an X25519 pair: private ``<name>.key`` sealed (0600), public ``<name>.pub`` (0644).

        ``stage`` writes it as ``<purpose>-next`` (a rotation in progress; not recorded). Otherwise
        the pair replaces the current one and is recorded under its public id. Returns the public key.
        """
        custodian = self._custodian()
        pub = x25519_public(private_bytes)
        sealed = seal_private(private_bytes, custodian.passphrase(), n=custodian.scrypt_n)
        name = staged(purpose) if stage else purpose
        if not stage:
            self._mark_pending(purpose, key_id(pub))
        self._write_file(self.path(name), sealed, 0o600)
        self._write_file(self.public_path(name), pub.hex().encode(), 0o644)
        if not stage:
            self._record(purpose, key_id(pub))
        return Key(purpose + ".pub", pub)

    def create_keypair(self, purpose: str = VAULT) -> Key:
        """Create a key pair (custodian only), never over an existing or recorded one.

        A first creation killed after its sealed private half and before its public half
        (:meth:`unfinished_pair`) is made again: that half is shredded first. It protected nothing
        (data is wrapped to the public half, which never existed) and was never recorded; kept,
        it refused every later creation and left a new haven stuck (found by review)."""
        if self.unfinished_pair(purpose):
            self.discard(purpose)
        if self.exists(purpose) or self.public_path(purpose).exists() or self.recorded(purpose):
            raise KeyRingError(f"key pair {purpose!r} already exists (key {self.current_id(purpose) or '-'})")
        return self.seal_keypair(purpose, x25519_private())

    def unfinished_pair(self, purpose: str = VAULT) -> bool:
        """Whether a first creation of ``purpose``'s pair stopped after its private half: that file
        alone, no public half, nothing recorded for the purpose (a first key's pending note aside:
        every key is noted before its file is written)."""
        public = self.public_path(purpose)
        return self.exists(purpose) and not (public.exists() or public.is_symlink()) and not self.recorded(purpose)

    def staged_pair(self, purpose: str) -> bool:
        """Whether a rotation left a staged pair (either half) for ``purpose``."""
        name = staged(purpose)
        return any(p.exists() or p.is_symlink() for p in (self.path(name), self.public_path(name)))

    def install_staged_pair(self, purpose: str) -> Key:
        """Make the staged pair current (no passphrase needed: the private half stays sealed)."""
        name = staged(purpose)
        check_key_file(self.path(name))
        sealed = self.path(name).read_bytes()
        if not sealed.startswith(SEALED_LABEL):
            raise KeyRingError(f"{self.path(name)} is not sealed; it cannot be installed")
        check_key_file(self.public_path(name), public=True)
        pub = hex_key(self.public_path(name))
        if pub is None:
            raise KeyRingError(f"{self.public_path(name)} does not hold a public key")
        self._mark_pending(purpose, key_id(pub))
        self._write_file(self.path(purpose), sealed, 0o600)
        self._write_file(self.public_path(purpose), pub.hex().encode(), 0o644)
        self._record(purpose, key_id(pub))
        self.discard(name)
        self.discard(name, public=True)
        return Key(purpose + ".pub", pub)

    def staged_public_id(self, purpose: str) -> str | None:
        """The id of a staged pair's public half, if it was written."""
        path = self.public_path(staged(purpose))
        material = hex_key(path) if path.exists() else None
        return key_id(material) if material else None

    def seal_in_place(self, purpose: str = VAULT, *, stage: bool = False) -> Key | None:
        """Seal an unsealed raw private key (a key ring from before sealing) under the custodian's
        passphrase, keeping the same pair; None when there is nothing unsealed to seal."""
        name = staged(purpose) if stage else purpose
        path = self.path(name)
        if not path.exists() or path.read_bytes().startswith(SEALED_LABEL):
            return None
        self._check_directory()
        check_key_file(path)
        raw = hex_key(path)
        if raw is None:
            raise KeyRingError(f"{path} holds neither a sealed nor a raw {KEY_BYTES}-byte key; restore it from backup")
        if not stage:
            self._check_pinned(purpose, key_id(x25519_public(raw)), path)
            if self.public_path(purpose).exists() and self.get_public(purpose).material != x25519_public(raw):
                raise KeyRingError(f"{path} is not the private half of {self.public_path(purpose)}; restore the pair")
        return self.seal_keypair(purpose, raw, stage=stage)

    def _custodian(self) -> Custodian:
        if self.custodian is None:
            raise KeyRingError("sealing a private key needs the key custodian's passphrase")
        return self.custodian

    # --- custody --------------------------------------------------------------------------

    def unsealed_private_keys(self) -> list[Path]:
        """Key files the pipeline could read a private key from: a PEM ``PRIVATE KEY`` that is not
        encrypted, a pair's private half that is not sealed, or any raw key whose X25519 public
        half is a recorded vault key (a copy of the private key under another name)."""
        if not self.directory.is_dir():
            return []
        pair_ids = {h["key_id"] for p in PAIRS for h in self._history(p)}
        found = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix == ".pub" or not path.is_file() or path.name == MANIFEST:
                continue
            data = path.read_bytes()
            if UNSEALED_LABEL in data:
                found.append(path)
            elif path.name.split(".")[0].removesuffix(STAGED_SUFFIX) in PAIRS:
                if not data.startswith(SEALED_LABEL):
                    found.append(path)
            elif (raw := hex_key(path)) is not None and key_id(x25519_public(raw)) in pair_ids:
                found.append(path)
        return found

    def check_custody(self) -> None:
        """Refuse to run the pipeline where it could read an unsealed private key (module docstring)."""
        found = self.unsealed_private_keys()
        if found:
            raise KeyRingError(
                f"{found[0]} holds an unencrypted private key, so the pipeline could read the identity vault; "
                "the key custodian seals it with `safehaven keys seal-vault` (or moves it off this host)"
            )

    # --- the record (keyring.json) --------------------------------------------------------

    def destroy(self, purpose: str) -> str | None:
        """Overwrite and unlink a key file (crypto-shredding); returns the destroyed key id."""
        path = self.path(purpose)
        if not path.exists():
            return None
        if purpose in PAIRS:
            public = self.public_path(purpose)
            kid = self.current_id(purpose)
            if public.exists() and not public.is_symlink():
                kid = key_id(self.get_public(purpose).material)  # a pair is known by its public half
                public.unlink()
        else:
            kid = self.get(purpose).key_id
        shred_file(path)
        if kid:
            self._record(purpose, kid, destroyed=True)
        return kid

    def retired_ids(self, purpose: str) -> list[str]:
        """Ids of earlier keys of ``purpose`` that were replaced (rotated out)."""
        return [h["key_id"] for h in self._history(purpose) if "retired_at" in h]

    def replacements(self, purpose: str) -> list[tuple[str, str]]:
        """(old id, new id) for each key of ``purpose`` the key ring records as retired, with the key
        recorded after it: the rotations ``keyring.json`` claims, which a file edit can forge (a
        rotation is taken as real only as ``safehaven.core.pins.unrecorded_rotations`` says)."""
        history = self._history(purpose)
        return [(old["key_id"], new["key_id"]) for old, new in itertools.pairwise(history) if "retired_at" in old]

    def destroyed_at(self, purpose: str, kid: str | None = None) -> str | None:
        """When the key ring recorded ``purpose``'s key (``kid``, else any) as destroyed."""
        for h in self._history(purpose):
            if "destroyed_at" in h and (kid is None or h["key_id"] == kid):
                return str(h["destroyed_at"])
        return None

    def current_id(self, purpose: str) -> str | None:
        entry = self.manifest().get(purpose)
        return entry.get("current") if isinstance(entry, dict) else None  # type: ignore[return-value]

    def recorded(self, purpose: str) -> bool:
        """Whether the key ring has ever recorded a key for ``purpose``."""
        return bool(self._history(purpose))

    def _history(self, purpose: str) -> list[dict[str, str]]:
        entry = self.manifest().get(purpose, {})
        history = entry.get("history", []) if isinstance(entry, dict) else []
        return history if isinstance(history, list) else []

    def _check_pinned(self, purpose: str, kid: str, path: Path) -> None:
        """Refuse a key whose id is not the one the key ring records for ``purpose`` (CoP 27b-c).

        A key file of which the ring has no note at all is refused too (the record deleted or
        emptied beside the key files was read as "nothing recorded", and any file accepted: found
        by review), except a staged key (:func:`is_staged`). A key noted as pending is accepted
        but never recorded by a read (a forged note would then pin the forger's key: found by
        review); its purpose's next write records it."""
        entry = self.manifest().get(purpose)
        entry = entry if isinstance(entry, dict) else {}
        current, pending, history = entry.get("current"), entry.get("pending"), entry.get("history")
        if kid in (current, pending):
            return
        if not history:
            if is_staged(purpose):
                return  # a rotation's or a new trail's key, recorded when it is installed
            raise KeyRingError(
                f"{path} holds key {kid}, but {self.directory / MANIFEST} has no note of any key for {purpose!r} "
                "(the record was deleted or emptied: the haven notes every key there before writing its file); "
                f"the key custodian checks the key files against the store and records them again with "
                f"`{RECOVER_COMMAND}` (audited)"
            )
        if current is None:
            raise KeyRingError(
                f"{path} holds key {kid}, but the key ring records {purpose!r} as destroyed; "
                "a destroyed key is never re-created: remove the file"
            )
        raise KeySubstituted(
            f"{path} holds key {kid}, but the key ring records key {current} for {purpose!r} "
            f"(swapped or substituted); restore key {current} from the key custodian's backup",
            path=path,
            found=kid,
            recorded=str(current),
        )

    def unnoted(self) -> dict[str, Key | None]:
        """The key files of which ``keyring.json`` has no note (no record, and no pending note of
        the id the file holds), by purpose, each read once: the key (a pair: its public half), or
        None when the file holds none. Only the haven's own purposes (:func:`is_purpose`); staged
        keys are left out (:func:`is_staged`)."""
        if not self.directory.is_dir():
            return {}
        manifest = self.manifest()
        found: dict[str, Key | None] = {}
        for path in sorted([*self.directory.glob("*.key"), *self.directory.glob("*.pub")]):
            purpose = path.name.rsplit(".", 1)[0]
            if not is_purpose(purpose) or purpose in found:
                continue
            entry = manifest.get(purpose)
            entry = entry if isinstance(entry, dict) else {}
            key = self.file_key(purpose)
            if not entry.get("history") and (key is None or entry.get("pending") != key.key_id):
                found[purpose] = key
        return found

    def file_key(self, purpose: str) -> Key | None:
        """The key ``purpose``'s file holds (a pair: its public half), checked as a key file but not
        against the record; None when there is no such readable file."""
        path = self.public_path(purpose) if purpose in PAIRS else self.path(purpose)
        if not path.is_file() or path.is_symlink():
            return None
        self._check_directory()
        check_key_file(path, public=purpose in PAIRS)
        material = hex_key(path)
        return Key(purpose + (".pub" if purpose in PAIRS else ""), material) if material else None

    def note_recovered(self, keys: dict[str, Key]) -> None:
        """Record each unnoted purpose's key after the key custodian's check against the store
        (``safehaven.protect.key_record``), all in one change of ``keyring.json``; refused, recording
        none, if any file changed since it was read."""
        with self._manifest_locked():
            unnoted = self.unnoted()
            for purpose, key in keys.items():
                now = unnoted.get(purpose)
                if now is None or now.material != key.material:
                    raise KeyRingError(
                        f"{self.path(purpose)} changed while it was checked; run `{RECOVER_COMMAND}` again"
                    )
            data = self.manifest()
            for purpose, key in keys.items():
                data = _recorded(data, purpose, key.key_id)
            self._save(data)

    def forget_recovered(self, purpose: str, kid: str) -> None:
        """Undo :meth:`note_recovered` (its audit entry could not be written): the purpose's entry
        is removed if it is still the one record that made."""
        with self._manifest_locked():
            data = self.manifest()
            entry = data.get(purpose)
            history = entry.get("history") if isinstance(entry, dict) else None
            if (
                isinstance(entry, dict)
                and entry.get("current") == kid
                and isinstance(history, list)
                and len(history) == 1
            ):
                del data[purpose]
                self._save(data)

    def manifest(self) -> dict[str, dict[str, object]]:
        """Key ids and dates per purpose; never material.

        The manifest pins each key file to the key id recorded for it, so one of another shape is
        refused, never read as "nothing recorded" (which accepted any key file and let a missing
        key be made anew: found by review): a JSON object of purposes, each ``current`` (a key id
        or null) and ``history`` (objects with a ``key_id``), no name twice (:func:`_manifest_shape`)."""
        path = self.directory / MANIFEST
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError):
            raise KeyRingError(f"{path} is not readable JSON; {_DAMAGED}") from None
        problem = _manifest_shape(data)
        if problem:
            raise KeyRingError(f"{path} is not a key ring manifest ({problem}); {_DAMAGED}")
        return data

    def _mark_pending(self, purpose: str, kid: str) -> None:
        """Note ``kid`` as ``pending`` for ``purpose`` before its file is written (a new purpose too),
        so a crash between the file and its record leaves a key the ring accepts, and a key file
        the ring has no note of is refused (:meth:`_check_pinned`)."""
        with self._manifest_locked():
            data = self.manifest()
            entry = data.setdefault(purpose, {"current": None, "history": []})
            entry["pending"] = kid
            self._save(data)

    def _record(self, purpose: str, kid: str, *, destroyed: bool = False) -> None:
        with self._manifest_locked():
            self._save(_recorded(self.manifest(), purpose, kid, destroyed=destroyed))

    def _manifest_locked(self) -> AbstractContextManager[None]:
        """Hold :data:`MANIFEST_LOCK` exclusively for one read-modify-write of ``keyring.json``."""
        return self._locked(MANIFEST_LOCK)

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the lock file ``name`` of the key directory exclusively; a lock file that cannot be
        opened (a link, a folder) is refused as a key problem, naming it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise KeyRingError(
                f"the key ring's lock file {path} cannot be opened ({exc.strerror}); remove it"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, data: dict[str, dict[str, object]]) -> None:
        self._write_file(self.directory / MANIFEST, json.dumps(data, indent=2, sort_keys=True).encode(), 0o600)

    def _check_directory(self) -> None:
        if self.directory.is_symlink():
            raise KeyRingError(f"key directory {self.directory} is a symbolic link")
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o022:
            raise KeyRingError(
                f"key directory {self.directory} is writable by group or others "
                f"(mode {mode:04o}); run: chmod 700 {self.directory}"
            )


def _recorded(
    data: dict[str, dict[str, object]], purpose: str, kid: str, *, destroyed: bool = False
) -> dict[str, dict[str, object]]:
    """``data`` (a parsed ``keyring.json``) with ``kid`` recorded for ``purpose``: made current (the
    one before retired), or marked destroyed; any pending note of ``purpose`` is cleared."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    entry = data.setdefault(purpose, {"current": None, "history": []})
    entry.pop("pending", None)
    history = entry["history"]
    assert isinstance(history, list)
    if destroyed:
        for item in history:
            if item["key_id"] == kid:
                item["destroyed_at"] = now
        entry["current"] = None
    elif kid != entry["current"]:  # the same key written again (sealed in place) stays current
        for item in history:
            if item["key_id"] == entry["current"] and "retired_at" not in item:
                item["retired_at"] = now
        history.append({"key_id": kid, "created_at": now})
        entry["current"] = kid
    return data


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


#: the purpose of an agreement's salt is this prefix and the agreement id (:func:`agreement_purpose`)
AGREEMENT_PREFIX = "agreement-"


def agreement_purpose(agreement_id: str) -> str:
    return f"{AGREEMENT_PREFIX}{check_agreement_id(agreement_id)}"


def agreement_key(keyring: KeyRing, agreement_id: str, *, create: bool = True) -> Key:
    """The pseudonym key of one agreement's domain (rule in the module docstring).

    HKDF-SHA256(ikm = haven key, salt = ``keys/agreement-<id>.key``,
    info = ``b"safehaven agreement pseudonym v1|" + id``). The salt is created once, when
    ``create`` and the key ring has never recorded one; a recorded salt that is missing (lost,
    or destroyed at disposal) is refused, never re-created: a new salt would give the recipient
    new pseudonyms for the same people with no crosswalk (CoP 43d).
    """
    purpose = agreement_purpose(agreement_id)
    if not keyring.exists(purpose):
        problem = missing_agreement_key(keyring, agreement_id)
        if problem or not create:
            raise KeyRingError(
                problem or f"agreement {agreement_id!r} has no pseudonym key yet ({keyring.path(purpose)})"
            )
        keyring.write(purpose, secrets.token_bytes(KEY_BYTES))
    return derive_agreement_key(keyring.get("haven").material, keyring.get(purpose).material, agreement_id)


def missing_agreement_key(keyring: KeyRing, agreement_id: str, expected: str | None = None) -> str | None:
    """Why an agreement's missing salt must not be re-created (None when it never existed).

    ``expected`` is the id the store pins for it (``safehaven.core.pins``), if any.
    """
    purpose = agreement_purpose(agreement_id)
    expected = expected or keyring.current_id(purpose)
    destroyed = keyring.destroyed_at(purpose)
    if destroyed and not keyring.current_id(purpose):
        return (
            f"agreement {agreement_id}'s pseudonym key was destroyed at disposal on {destroyed[:10]}; "
            "its pseudonym domain is gone and nothing more is released under it"
        )
    if expected or keyring.recorded(purpose):
        return (
            f"agreement {agreement_id}'s pseudonym key {keyring.path(purpose).name} "
            f"(key {expected or '-'}) is missing; "
            "restore it from the key custodian's backup (a new key would break the recipient's linkage)"
        )
    return None


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
    return sorted(p.stem[len(AGREEMENT_PREFIX) :] for p in keyring.directory.glob(f"{AGREEMENT_PREFIX}*.key"))


def destroy_agreement_key(keyring: KeyRing, agreement_id: str) -> str | None:
    """Crypto-shred an agreement's pseudonym domain: overwrite and remove its salt file."""
    return keyring.destroy(agreement_purpose(agreement_id))
