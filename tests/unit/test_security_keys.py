"""Identities: key files round trip, 0600 private keys, one-line errors, the scenario's
[security] section, and `edgeddl keys new`."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from edgeddl.cli.main import main
from edgeddl.config.loader import ConfigError, load_scenario, scenario_from_dict, to_toml
from edgeddl.security.keys import (
    Identity,
    SecurityError,
    enrolled,
    key_paths,
    load_identity,
    load_public,
    save_identity,
)

FLEET = """
[[fleet.devices]]
name = "pi"
profile = "rpi4"
count = 2
"""


def _raw(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


def test_key_files_round_trip_and_private_file_is_0600(tmp_path: Path) -> None:
    ident = Identity.generate("pi-0")
    save_identity(ident, tmp_path)
    private, public = key_paths(tmp_path, "pi-0")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind
    loaded = load_identity(private)
    assert loaded.name == "pi-0"
    # Same keys: what the loaded identity signs, the original public key verifies.
    assert ident.public().verify(loaded.sign(b"msg"), b"msg")
    pub = load_public(public)
    assert _raw(pub.sign_key) == _raw(ident.public().sign_key)
    assert _raw(pub.agree_key) == _raw(ident.public().agree_key)


def test_existing_identity_is_not_overwritten(tmp_path: Path) -> None:
    save_identity(Identity.generate("pi-0"), tmp_path)
    before = (tmp_path / "pi-0.key").read_bytes()
    with pytest.raises(SecurityError, match="already exists"):
        save_identity(Identity.generate("pi-0"), tmp_path)
    assert (tmp_path / "pi-0.key").read_bytes() == before


def test_key_file_errors_are_one_line(tmp_path: Path) -> None:
    save_identity(Identity.generate("pi-0"), tmp_path)
    private, public = key_paths(tmp_path, "pi-0")
    cases: list[tuple[Path, str]] = [(tmp_path / "missing.key", "no such private key file")]
    damaged = tmp_path / "damaged.key"
    damaged.write_bytes(b"not a key at all\n")
    cases.append((damaged, "damaged: not a PEM key file"))
    garbled = tmp_path / "garbled.key"
    text = private.read_text().splitlines()
    text[1] = "A" * len(text[1])
    garbled.write_text("\n".join(text) + "\n")
    cases.append((garbled, "damaged: a private key block does not load"))
    rsa = tmp_path / "rsa.key"
    rsa.write_bytes(
        generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cases.append(
        (rsa, "wrong kind of key: expected one Ed25519 and one X25519 private key, found RSA")
    )
    cases.append((public, "holds public keys"))
    for path in (damaged, garbled, rsa):
        path.chmod(0o600)
    for path, message in cases:
        with pytest.raises(SecurityError, match=message) as err:
            load_identity(path)
        assert "\n" not in str(err.value)
    with pytest.raises(SecurityError, match="holds private keys"):
        load_public(private)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    private = save_identity(Identity.generate("pi-0"), tmp_path)
    private.chmod(0o644)
    with pytest.raises(SecurityError, match=r"permissions 0644 .*chmod 600"):
        load_identity(private)


def test_security_section_round_trips_and_enrolls(tmp_path: Path) -> None:
    devices = [Identity.generate(f"pi-{i}") for i in range(2)]
    coord = Identity.generate("coordinator")
    tables = "".join(d.public().scenario_toml() for d in [*devices, coord])
    text = FLEET + "[security]\nenabled = true\nmax_payload_bytes = 100000\n" + tables
    scenario = scenario_from_dict(tomllib.loads(text))
    assert set(scenario.security.devices) == {"pi-0", "pi-1"}
    assert scenario_from_dict(tomllib.loads(to_toml(scenario))) == scenario
    peers = enrolled(scenario.security)
    assert set(peers) == {"pi-0", "pi-1", "coordinator"}
    assert peers["pi-1"].verify(devices[1].sign(b"x"), b"x")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[security]\nenabled = true\n", "security.coordinator: enabled security needs"),
        ("[security]\nmax_payload_bytes = 10\n", "security.max_payload_bytes must be >= 1024"),
        ("[security]\nsalt = 1\n", "security.salt: unknown key"),
        ('[security.devices.pi-0]\nsign = "abc"\nagree = "abc"\n', "security.devices.pi-0.sign"),
        (
            "[security.devices.pi-9]\n" + 'sign = "{k}"\nagree = "{k}"\n',
            "security.devices.pi-9: not a device of",
        ),
    ],
)
def test_security_section_errors(extra: str, message: str) -> None:
    key = Identity.generate("x").public().to_config().sign
    with pytest.raises(ConfigError, match=message) as err:
        scenario_from_dict(tomllib.loads(FLEET + extra.replace("{k}", key)))
    assert "\n" not in str(err.value)


def test_cli_keys_new_prints_a_table_the_scenario_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("pi-0", "coordinator"):
        assert main(["keys", "new", name, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "pi-0.key").stat().st_mode) == 0o600
    tables = "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))
    scenario_file = tmp_path / "s.toml"
    scenario_file.write_text(FLEET + "[security]\nenabled = true\n" + tables)
    scenario = load_scenario(scenario_file)
    peers = enrolled(scenario.security)
    assert peers["pi-0"].verify(load_identity(tmp_path / "pi-0.key").sign(b"m"), b"m")
    # A second `keys new` for the same name would destroy the identity: refused, exit 2.
    assert main(["keys", "new", "pi-0", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
