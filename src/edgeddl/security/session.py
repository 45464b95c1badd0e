"""A simulated run with `[security]` on: every party's part, with the real primitives.

The simulator plays the coordinator and every device, so it holds all their private keys.
Each device has a session with the coordinator (the real handshake, made again after it
crashed or left), signs its real payload bytes and sends them in that session's frames; the
coordinator opens and records them, and the ledger gets every update, refusal, aggregation
and membership change. Handshakes, envelopes and crypto are charged as bytes and device
compute; `envelope_fault` makes a device group misbehave.
Details: docs/trust.md#the-simulated-session
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.io import write_json_atomic
from edgeddl.security.envelope import Opened, Receiver, Rejection, Sender
from edgeddl.security.handshake import Initiator, Responder, Session, handshake_bytes
from edgeddl.security.keys import (
    Identity,
    PublicIdentity,
    SecurityError,
    enrolled,
    key_paths,
    load_identity,
)
from edgeddl.security.ledger import (
    CONFIG_FILE,
    HEAD_FILE,
    LEDGER_FILE,
    Ledger,
    aggregate_payload,
    closing_payload,
    file_sha256,
    model_digest,
    read_entries,
    reject_payload,
    run_payload,
    sign_head,
    update_payload,
)


@dataclass(frozen=True, slots=True)
class SealedStep:
    up_bytes: np.ndarray
    """What each device sends, its envelope included (rounds x devices)."""
    down_bytes: np.ndarray
    """What each device receives at the step's start, its envelope included."""
    crypto_bytes: np.ndarray
    """Bytes each device seals (its payload) and opens (what it receives)."""
    accepted: np.ndarray
    entries: list[int]
    """The ledger index of each device's update entry (-1: refused)."""


class SecureRun:
    """The run's identities, envelopes and ledger (docs/trust.md#the-simulated-session)."""

    def __init__(
        self, scenario: Scenario, run_dir: Path, resume: dict[str, Any] | None = None
    ) -> None:
        """A new run's ledger in `run_dir`; or with `resume` (a checkpoint's `state()`) the
        run's own ledger, continued after a `resumed` entry."""
        cfg = scenario.security
        self.names = scenario.fleet.device_names()
        self.peers = enrolled(cfg)
        missing = [n for n in self.names if n not in self.peers]
        if missing:
            raise ConfigError(
                f"security.devices: {missing[0]} is not enrolled; every device of a secured "
                "run needs its public keys (`edgeddl keys new NAME` prints them)"
            )
        if not cfg.keys_dir:
            raise ConfigError(
                "security.keys_dir: the simulator plays every party and needs their private "
                "keys: the folder `edgeddl keys new NAME --out DIR` wrote them to"
            )
        folder = Path(cfg.keys_dir)
        self.coordinator = self._identity(folder, SECURITY_COORDINATOR)
        self.run_id = resume["run_id"] if resume else f"{scenario.run.name}-{uuid.uuid4().hex[:12]}"
        faults = [g.envelope_fault for g in scenario.fleet.devices for _ in range(g.count)]
        self.faults = faults
        self.senders = []
        self.identities = [self._identity(folder, name) for name in self.names]
        for who, fault in zip(self.identities, faults, strict=True):
            self.senders.append(
                Sender(who if fault != "impostor" else impostor(who.name), self.run_id)
            )
        self.sessions: dict[int, tuple[Session, Session]] = {}
        """Device -> (its session, the coordinator's) while it is in the fleet."""
        self.handshake_bytes = np.array(
            [handshake_bytes(self.run_id, n, SECURITY_COORDINATOR) for n in self.names]
        )
        """Per device, the bytes its handshake sends and receives."""
        self.faulty = [FaultySender(f, cfg.max_payload_bytes) for f in faults]
        self.receiver = Receiver(
            self.coordinator, self.run_id, self.peers, max_payload_bytes=cfg.max_payload_bytes
        )
        self.max_payload_bytes = cfg.max_payload_bytes
        self.run_dir = run_dir
        path = run_dir / LEDGER_FILE
        self.rejected: list[dict[str, object]] = []
        if resume is not None:
            self._resume(path, resume, cfg.ledger_flush_every)
            return
        if path.exists():  # an earlier run's in this folder: kept aside, not continued
            path.replace(path.with_name(LEDGER_FILE + ".previous"))
        self.ledger = Ledger(path, flush_every=cfg.ledger_flush_every)
        self.ledger.append(
            self.coordinator,
            "run",
            run_payload(self.run_id, scenario.run.name, self.names, run_dir),
            time_s=0.0,
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the run id, sequence numbers, replay windows, refusals
        and the ledger's head (flushed first, so the entry it names is on disk)."""
        self.ledger.flush()
        return {
            "run_id": self.run_id,
            "next_seq": [s.next_seq for s in self.senders],
            "seen": self.receiver.windows(),
            "first_wire": [f.first_wire for f in self.faulty],
            "rejected": list(self.rejected),
            "ledger_head": [self.ledger.index, self.ledger.head_hash],
            "sessions": sorted(self.sessions),
        }

    def _resume(self, path: Path, state: dict[str, Any], flush_every: int) -> None:
        """Reopen the run's ledger where the checkpoint left it: the entry it names must be
        there unchanged. Entries after it (a run killed after its checkpoint) stay: the
        senders number on past every sequence number they hold."""
        index, head_hash = state["ledger_head"]
        entries, _ = read_entries(path) if path.exists() else ([], 0)
        at = entries[index] if 0 <= index < len(entries) else None
        lines = path.read_bytes().split(b"\n") if at is not None else []
        if at is None or hashlib.sha256(lines[index]).hexdigest() != head_hash:
            raise ConfigError(
                f"{path}: does not hold the checkpoint's ledger entry {index} unchanged; "
                "it cannot be continued"
            )
        used: dict[str, int] = {}
        for e in entries[index + 1 :]:
            if e is not None and e.get("kind") == "update" and isinstance(e.get("payload"), dict):
                who, seq = e["payload"].get("device"), e["payload"].get("seq")
                if isinstance(who, str) and isinstance(seq, int):
                    used[who] = max(used.get(who, -1), seq)
        for sender, seq in zip(self.senders, state["next_seq"], strict=True):
            sender.next_seq = max(seq, used.get(sender.identity.name, -1) + 1)
        self.receiver.restore_windows(state["seen"])
        for faulty, wire in zip(self.faulty, state["first_wire"], strict=True):
            faulty.first_wire = wire
        self.rejected = list(state["rejected"])
        self.ledger = Ledger(path, flush_every=flush_every)
        for d in state.get("sessions", []):  # the virtual fleet did not stop: no new handshake
            self._session(d)

    def _identity(self, folder: Path, name: str) -> Identity:
        return enrolled_identity(folder, name, self.peers)

    def event(self, at_s: float, device: int, action: str) -> None:
        if action in ("crash", "leave"):  # it comes back with a new session
            self.sessions.pop(device, None)
        self.ledger.append(self.coordinator, action, {"device": self.names[device]}, time_s=at_s)

    def _session(self, d: int) -> tuple[tuple[Session, Session], bool]:
        """Device `d`'s session pair, and whether its handshake was made just now."""
        pair = self.sessions.get(d)
        if pair is not None:
            return pair, False
        devices = {n: p for n, p in self.peers.items() if n != SECURITY_COORDINATOR}
        initiator = Initiator(self.identities[d], self.coordinator.public())
        responder = Responder(self.coordinator, self.run_id, devices)
        confirm, mine = initiator.confirm(responder.reply(initiator.hello()))
        pair = self.sessions[d] = (mine, responder.accept(confirm))
        return pair, True

    def seal_and_open(
        self, step: int, at_s: float, devices: np.ndarray, bodies: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Seal each device's body, open it at the coordinator; (accepted, bytes on the
        wire, the ledger index of each accepted update, -1 for a refused one)."""
        accepted = np.zeros(len(devices), dtype=bool)
        wire_bytes = np.zeros(len(devices), dtype=np.int64)
        self.fresh = np.zeros(len(devices), dtype=bool)
        entries = []
        for i, (d, body) in enumerate(zip(devices.tolist(), bodies, strict=True)):
            (mine, theirs), self.fresh[i] = self._session(d)
            frame = mine.seal(self._send(d, body, step))
            wire_bytes[i] = len(frame)
            opened = self.receiver.open(theirs.open(frame))
            if isinstance(opened, Opened) and opened.header.step != step:  # sealed for another
                opened = Rejection(
                    "replayed", opened.header.sender, f"sealed for step {opened.header.step}"
                )
            if isinstance(opened, Opened):
                accepted[i] = True
                entry = self.ledger.append(
                    self.coordinator, "update", update_payload(opened), time_s=at_s
                )
                entries.append(entry)
            else:
                payload = reject_payload(opened, step=step)
                payload["device"] = self.names[d]  # who sent it, whatever it claimed
                self.rejected.append({**payload, "claimed": opened.sender})
                self.ledger.append(self.coordinator, "reject", payload, time_s=at_s)
                entries.append(-1)
        return accepted, wire_bytes, entries

    def _send(self, d: int, body: bytes, step: int) -> bytes:
        """What device `d` puts on the wire: its sealed body, or its fault's version."""
        return self.faulty[d].seal(
            self.senders[d], self.receiver.identity.public(), body, step, self.ledger.head
        )

    def seal_step(
        self,
        step: int,
        at_s: float,
        idx: np.ndarray,
        bodies: list[bytes],
        up_bytes: np.ndarray,
        down_bytes: np.ndarray,
    ) -> SealedStep:
        """One step's payloads sealed and opened: what they cost each device in bytes (its
        update up, the model or aggregate down), and which were accepted."""
        accepted, wire, entries = self.seal_and_open(step, at_s, idx, bodies)
        body = np.array([len(b) for b in bodies], dtype=np.int64)
        envelope = wire - body
        down = np.asarray(down_bytes, dtype=np.int64)
        hello_up, hello_down = (np.where(self.fresh, n, 0) for n in self.handshake_bytes[idx].T)
        up = np.asarray(up_bytes) + envelope[None]
        up[0] += hello_up  # a new session's handshake before its first payload
        return SealedStep(
            up_bytes=up,
            down_bytes=np.where(down > 0, down + envelope, 0) + hello_down,
            crypto_bytes=body + down,
            accepted=accepted,
            entries=entries,
        )

    def aggregate(
        self,
        step: int,
        at_s: float,
        model: nn.Module,
        entries: list[int],
        screened: dict[int, str] | None = None,
    ) -> None:
        """The step's `aggregate` entry: `entries` it used, `screened` (entry -> reason)
        the robust screen kept out. None when nothing arrived: the model did not change,
        and an aggregate must name its inputs."""
        if not entries and not screened:
            return
        payload = aggregate_payload(step, entries, digest(model), screened)
        self.ledger.append(self.coordinator, "aggregate", payload, time_s=at_s)

    def mark(self, kind: str, at_s: float, model: nn.Module, payload: dict[str, Any]) -> None:
        """A `checkpoint` or `resumed` entry with the model's digest (a resumed one also
        with the config the run goes on with: a resume may change some keys)."""
        if kind == "resumed":
            payload = {**payload, "config_sha256": file_sha256(self.run_dir / CONFIG_FILE)}
        self.ledger.append(
            self.coordinator, kind, {**payload, "model_digest": digest(model)}, time_s=at_s
        )

    def summary(self, model: nn.Module) -> dict[str, object]:
        """The run's `model_digest` and `security` keys, before `close` (counted in)."""
        return ledger_summary(self.ledger, self.run_id, self.rejected, digest(model))

    def close(self, at_s: float, model: nn.Module, *, interrupted_at: int | None = None) -> None:
        """Close the ledger with `run_end`, or `interrupted` at that step (a resumed run
        continues it), once model.pt and summary.json are written."""
        kind = "run_end" if interrupted_at is None else "interrupted"
        payload = {} if interrupted_at is None else {"step": interrupted_at}
        close_ledger(
            self.ledger,
            self.coordinator,
            self.run_id,
            self.run_dir,
            digest(model),
            at_s,
            kind=kind,
            payload=payload,
        )


def ledger_summary(
    ledger: Ledger, run_id: str, rejected: list[dict[str, object]], final_digest: str
) -> dict[str, Any]:
    """The run's `model_digest` and `security` keys for summary.json, which is written
    before the ledger's closing entry: `ledger_entries` counts that entry."""
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[str(r["reason"])] = reasons.get(str(r["reason"]), 0) + 1
    return {
        "model_digest": final_digest,
        "security": {
            "run_id": run_id,
            "ledger_entries": ledger.index + 2,
            "num_rejected": len(rejected),
            "rejected_by_reason": reasons,
            "rejected_payloads": rejected,
        },
    }


def close_ledger(
    ledger: Ledger,
    author: Identity,
    run_id: str,
    run_dir: Path,
    final_digest: str,
    at_s: float | None = None,
    *,
    kind: str = "run_end",
    payload: dict[str, Any] | None = None,
) -> None:
    """The closing order's last step, once model.pt and summary.json are written: `run_end`
    (or `interrupted`) naming the final model's digest and both files' SHA-256, the ledger
    closed, and its signed head written beside it (ledger.head.json, to publish)."""
    closing = {**(payload or {}), **closing_payload(run_dir, final_digest)}
    ledger.append(author, kind, closing, time_s=at_s)
    ledger.close()
    head = sign_head(author, run_id, ledger.index + 1, ledger.head_hash)
    write_json_atomic(Path(run_dir) / HEAD_FILE, head.to_json())


def impostor(name: str) -> Identity:
    """A device's `impostor` fault: it signs with an identity nobody enrolled."""
    return Identity.generate(f"impostor-{name}")


class FaultySender:
    """What a device with an `envelope_fault` puts on the wire instead of its payload
    (forged, tampered, replayed, oversized; an impostor's identity is its `Sender`'s)."""

    def __init__(self, fault: str, max_payload_bytes: int) -> None:
        self.fault, self.max_payload_bytes = fault, max_payload_bytes
        self.forger = Identity.generate("forger") if fault == "forged_signature" else None
        self.first_wire: bytes | None = None

    def seal(
        self,
        sender: Sender,
        recipient: PublicIdentity,
        body: bytes,
        step: int,
        ledger_head: tuple[int, bytes],
    ) -> bytes:
        fault = self.fault
        if fault == "oversized":
            body = body + bytes(max(self.max_payload_bytes - len(body) + 1, 0))
        wire = sender.seal(recipient, body, step=step, ledger_head=ledger_head)
        if fault == "tampered":
            flipped = bytearray(wire)
            flipped[-100] ^= 0x01  # inside the ciphertext (before the 64-byte signature)
            wire = bytes(flipped)
        elif self.forger is not None:
            wire = wire[:-64] + self.forger.sign(wire[:-64])
        elif fault == "replayed":  # its first payload, again and again
            self.first_wire = self.first_wire or wire
            wire = self.first_wire
        return wire


def enrolled_identity(folder: Path, name: str, peers: Mapping[str, PublicIdentity]) -> Identity:
    """`name`'s private identity from `folder` (`security.keys_dir`), which must be the one
    the scenario enrolls (one-line ConfigError otherwise)."""
    private, _ = key_paths(folder, name)
    try:
        identity = load_identity(private)
    except (SecurityError, OSError) as e:
        raise ConfigError(f"security.keys_dir: {e}") from None
    enrolled_keys = peers.get(name)
    if enrolled_keys is None or identity.public().to_config() != enrolled_keys.to_config():
        raise ConfigError(
            f"security.keys_dir: {private} is not the identity the scenario enrolls as {name!r}"
        )
    return identity


def secure_run(
    scenario: Scenario, run_dir: Path, resume: dict[str, Any] | None = None
) -> SecureRun:
    """The run's `SecureRun`, once the scenario is one it can seal (one-line errors)."""
    check_sealable(scenario)
    return SecureRun(scenario, run_dir, resume)


def check_sealable(scenario: Scenario) -> None:
    """One-line ConfigError for a scenario whose payloads cannot be sealed (yet)."""
    t = scenario.train
    if t.topology != "star":
        raise ConfigError(
            "security.enabled: payloads are sealed between each device and the coordinator; "
            'set train.topology = "star"'
        )
    comp = scenario.compression
    if any(COMPRESSORS[c.compressor].num_phases > 1 for c in [comp, *comp.groups.values()]):
        raise ConfigError(
            "security.enabled: a multi-round compressor's payloads are summed on the way; "
            "use a single-payload compressor (e.g. topk, two_step, int8)"
        )


def digest(model: nn.Module) -> str:
    with torch.no_grad():
        return model_digest(model.state_dict())
