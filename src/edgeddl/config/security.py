"""The `[security]` section: enrolled identities' public keys and the payload limits."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from edgeddl.config.checks import require as _require


@dataclass(kw_only=True, slots=True)
class PublicKeyConfig:
    """An enrolled identity's public keys, as `edgeddl keys new NAME` prints them."""

    sign: str = ""
    """Ed25519 signature key: base64 of its 32 raw bytes."""
    agree: str = ""
    """X25519 key-agreement key: base64 of its 32 raw bytes."""

    def __post_init__(self) -> None:
        for key in ("sign", "agree"):
            value = getattr(self, key)
            _require(
                value == "" or _raw_key_length(value) == 32,
                f"{key}: expected base64 of a 32-byte public key, as `edgeddl keys new` "
                f"prints it (got {value[:60]!r})",
            )
        _require(
            (self.sign == "") == (self.agree == ""),
            "sign and agree: give both public keys or neither",
        )

    @property
    def is_set(self) -> bool:
        return self.sign != ""


def _raw_key_length(text: str) -> int:
    try:
        return len(base64.b64decode(text, validate=True))
    except binascii.Error:
        return -1


SECURITY_COORDINATOR = "coordinator"
"""The coordinator's identity name (its ledger entries' author); no device may take it."""


@dataclass(kw_only=True, slots=True)
class SecurityConfig:
    """Signed, encrypted payloads between enrolled devices and the coordinator, and the
    audit ledger (`edgeddl.security`)."""

    enabled: bool = False
    coordinator: PublicKeyConfig = field(default_factory=PublicKeyConfig)
    """The coordinator's public keys (`edgeddl keys new coordinator`)."""
    devices: dict[str, PublicKeyConfig] = field(default_factory=dict)
    """Enrolled devices' public keys by device name; a device not listed is refused."""
    max_payload_bytes: int = 64 * 2**20
    """Payloads larger than this on the wire are refused before any crypto is spent on them,
    and none is decoded (decompressed) past it."""
    ledger_flush_every: int = 32
    """Ledger entries written and fsynced together (a crash loses at most the unflushed)."""
    keys_dir: str = ""
    """The simulator plays every party: the folder holding the private keys of the
    coordinator and of every device (`edgeddl keys new NAME --out DIR`)."""

    def __post_init__(self) -> None:
        _require(
            self.max_payload_bytes >= 1024,
            f"max_payload_bytes must be >= 1024 (got {self.max_payload_bytes})",
        )
        _require(
            self.ledger_flush_every >= 1,
            f"ledger_flush_every must be >= 1 (got {self.ledger_flush_every})",
        )
        _require(
            SECURITY_COORDINATOR not in self.devices,
            f"devices.{SECURITY_COORDINATOR}: that name is the coordinator's; give its keys "
            "in [security.coordinator]",
        )
        for name, keys in self.devices.items():
            _require(keys.is_set, f"devices.{name}: needs sign and agree keys")
        if self.enabled:
            _require(
                self.coordinator.is_set,
                "coordinator: enabled security needs the coordinator's public keys "
                "(`edgeddl keys new coordinator` prints them)",
            )

    def check_devices(self, names: list[str]) -> None:
        """Every enrolled name is a device of the fleet (a typo would refuse a real device)."""
        unknown = sorted(set(self.devices) - set(names))
        if unknown:
            raise ValueError(f"security.devices.{unknown[0]}: not a device of [fleet]")
