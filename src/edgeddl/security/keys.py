"""Identities: an Ed25519 key pair to sign and an X25519 key pair to agree on keys.

A device's (or the coordinator's) identity lives in two PEM files named after it:
``NAME.key`` (both private keys, PKCS#8, created 0600 and written atomically) and ``NAME.pub``
(both public keys). What a scenario lists is the public record: the two raw public keys in
base64 under ``[security.devices.NAME]`` (``[security.coordinator]`` for the coordinator).
Every problem with a key file is a `SecurityError` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgeddl.config.security import SECURITY_COORDINATOR, PublicKeyConfig, SecurityConfig
from edgeddl.io import write_bytes_atomic

MAX_NAME_BYTES = 255
"""Identity names travel in every envelope header with a one-byte length."""

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecurityError(ValueError):
    """A key file, identity or ledger that cannot be used; the message is one line."""


def check_name(name: str) -> str:
    """An identity name usable as a file name and in an envelope header."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise SecurityError(f"identity name {name!r}: must be a plain name, without / or a dot")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise SecurityError(f"identity name {name[:40]!r}...: longer than {MAX_NAME_BYTES} bytes")
    return name


def name_bytes(*names: str) -> bytes:
    """The names as they travel in headers: each checked, its length in one byte first."""
    out = b""
    for name in names:
        raw = check_name(name).encode("utf-8")
        out += bytes([len(raw)]) + raw
    return out


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """Who someone is to everyone else: a name and two public keys."""

    name: str
    sign_key: Ed25519PublicKey
    agree_key: X25519PublicKey

    @classmethod
    def from_config(cls, name: str, keys: PublicKeyConfig) -> PublicIdentity:
        try:
            sign = Ed25519PublicKey.from_public_bytes(base64.b64decode(keys.sign, validate=True))
            agree = X25519PublicKey.from_public_bytes(base64.b64decode(keys.agree, validate=True))
        except (binascii.Error, ValueError):
            raise SecurityError(f"{name}: public keys are not base64 of 32 raw bytes") from None
        return cls(check_name(name), sign, agree)

    def to_config(self) -> PublicKeyConfig:
        return PublicKeyConfig(
            sign=base64.b64encode(self.sign_key.public_bytes(*_RAW)).decode(),
            agree=base64.b64encode(self.agree_key.public_bytes(*_RAW)).decode(),
        )

    def scenario_toml(self) -> str:
        """The table to paste into a scenario to enroll this identity."""
        keys = self.to_config()
        table = (
            "security.coordinator"
            if self.name == SECURITY_COORDINATOR
            else f'security.devices."{self.name}"'
        )
        return f'[{table}]\nsign = "{keys.sign}"\nagree = "{keys.agree}"\n'

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self.sign_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Identity:
    """One's own identity: the name and both private keys."""

    name: str
    sign_key: Ed25519PrivateKey
    agree_key: X25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(check_name(name), Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.sign_key.public_key(), self.agree_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.sign_key.sign(data)


def key_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """(private, public) key files of identity `name` in `folder`."""
    return folder / f"{check_name(name)}.key", folder / f"{name}.pub"


def save_identity(identity: Identity, folder: Path, *, overwrite: bool = False) -> Path:
    """Write NAME.key (0600) and NAME.pub; refuse to replace an identity unless told to."""
    private, public = key_paths(folder, identity.name)
    if private.exists() and not overwrite:
        raise SecurityError(
            f"{private}: already exists; replacing it would lose that identity "
            "(remove it first, or choose another name)"
        )
    pkcs8 = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    secret = identity.sign_key.private_bytes(pem, *pkcs8)
    secret += identity.agree_key.private_bytes(pem, *pkcs8)
    write_bytes_atomic(private, secret, mode=0o600)
    pub = identity.public()
    write_bytes_atomic(
        public,
        b"".join(k.public_bytes(pem, spki) for k in (pub.sign_key, pub.agree_key)),
        mode=0o644,
    )
    return private


def _pem_blocks(path: Path, what: str) -> list[tuple[str, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(
            f"{path}: no such {what} file (make one with `edgeddl keys new {path.stem}`)"
        ) from None
    except OSError as e:
        raise SecurityError(f"{path}: cannot read: {e.strerror}") from None
    blocks = [(m.group(1).decode(), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    if not blocks:
        raise SecurityError(f"{path}: damaged: not a PEM key file")
    return blocks


def load_identity(path: Path) -> Identity:
    """Read a NAME.key file written by `save_identity` (name from the file name)."""
    sign, agree = _load_pair(Path(path), private=True)
    return Identity(check_name(Path(path).stem), sign, agree)


def load_public(path: Path) -> PublicIdentity:
    """Read a NAME.pub file written by `save_identity`."""
    sign, agree = _load_pair(Path(path), private=False)
    return PublicIdentity(check_name(Path(path).stem), sign, agree)


def _load_pair(path: Path, *, private: bool) -> tuple[Any, Any]:
    """(Ed25519, X25519) keys of a key file, private or public, each problem one line."""
    what, other, suffix = ("private", "public", "key") if private else ("public", "private", "pub")
    blocks = _pem_blocks(path, f"{what} key")
    if any(other.upper() in label for label, _ in blocks):
        raise SecurityError(f"{path}: holds {other} keys; expected the {what} NAME.{suffix} file")
    if private and os.name == "posix" and path.stat().st_mode & 0o077:
        raise SecurityError(
            f"{path}: permissions {path.stat().st_mode & 0o777:04o} let others read the "
            f"private key; run `chmod 600 {path}`"
        )
    keys = []
    for _, block in blocks:
        try:
            keys.append(
                serialization.load_pem_private_key(block, password=None)
                if private
                else serialization.load_pem_public_key(block)
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SecurityError(f"{path}: damaged: a {what} key block does not load") from None
    kinds = (
        (Ed25519PrivateKey, X25519PrivateKey) if private else (Ed25519PublicKey, X25519PublicKey)
    )
    signs = [k for k in keys if isinstance(k, kinds[0])]
    agrees = [k for k in keys if isinstance(k, kinds[1])]
    if len(signs) != 1 or len(agrees) != 1 or len(keys) != 2:
        found = ", ".join(
            type(k).__name__.removesuffix("PrivateKey").removesuffix("PublicKey") for k in keys
        )
        raise SecurityError(
            f"{path}: wrong kind of key: expected one Ed25519 and one X25519 {what} key, "
            f"found {found}"
        )
    return signs[0], agrees[0]


def enrolled(config: SecurityConfig) -> dict[str, PublicIdentity]:
    """Every identity a scenario trusts, by name: its devices and its coordinator."""
    peers = {n: PublicIdentity.from_config(n, k) for n, k in config.devices.items()}
    if config.coordinator.is_set:
        peers[SECURITY_COORDINATOR] = PublicIdentity.from_config(
            SECURITY_COORDINATOR, config.coordinator
        )
    return peers
