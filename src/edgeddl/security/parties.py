"""The two parties of a secured real fleet, each with only its own private key.

`CoordinatorParty` opens what devices send (`Receiver`: signature, ciphertext, sequence,
size, enrolled sender; then: sealed for this step, by the device whose link it came over),
records each `update` with the device's receipt or each `reject` with its reason, seals its
answers for each device, and closes the ledger naming the final model's digest and files.
`DeviceParty` seals a device's payloads with the ledger head it last saw (or, with an
`envelope_fault`, what a misbehaving device would send instead) and opens the coordinator's
answers. Every link is a session (`handshake.py`): the coordinator's `responder` and the
device's `initiator`, the device trusting only the coordinator key it holds itself
(`coordinator.pub` in its key folder). A device's new session starts with `hello`: the
sequence number the coordinator expects from it next (so a restarted device goes on from
there) and the ledger head. Which payloads they carry is the runtime's business
(`runtime/fleet/secure_coordinator.py`, `runtime/fleet/split_rear.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeddl.compress.bitpack import CodecError
from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.security.envelope import NO_LEDGER_HEAD, Opened, Receiver, Rejection, Sender
from edgeddl.security.handshake import Initiator, Responder
from edgeddl.security.keys import PublicIdentity, SecurityError, enrolled, key_paths, load_public
from edgeddl.security.ledger import (
    LEDGER_FILE,
    Ledger,
    aggregate_payload,
    reject_payload,
    run_payload,
    update_payload,
)
from edgeddl.security.session import (
    FaultySender,
    close_ledger,
    enrolled_identity,
    impostor,
    ledger_summary,
)


class Refused(ValueError):
    """A payload the coordinator refused (recorded with its reason)."""


class CoordinatorParty:
    """The coordinator's envelopes and ledger; see the module docstring and docs/trust.md."""

    def __init__(self, scenario: Scenario, out_dir: Path, run_id: str) -> None:
        """`run_id`: the coordinator's run (its store's values are bound to the same)."""
        cfg = scenario.security
        self.names = scenario.fleet.device_names()
        self.peers = enrolled(cfg)
        self.identity = enrolled_identity(Path(cfg.keys_dir), SECURITY_COORDINATOR, self.peers)
        self.run_id = run_id
        self.receiver = Receiver(
            self.identity, self.run_id, self.peers, max_payload_bytes=cfg.max_payload_bytes
        )
        self.sender = Sender(self.identity, self.run_id)
        self.max_payload_bytes = cfg.max_payload_bytes
        self.out_dir = out_dir
        path = out_dir / LEDGER_FILE
        if path.exists():  # an earlier run's in this folder: kept aside, not continued
            path.replace(path.with_name(LEDGER_FILE + ".previous"))
        self.ledger = Ledger(path, flush_every=cfg.ledger_flush_every)
        self.ledger.append(
            self.identity, "run", run_payload(self.run_id, scenario.run.name, self.names, out_dir)
        )
        self.rejected: list[dict[str, object]] = []
        self.steps_aggregated = 0

    def responder(self) -> Responder:
        """A new link's side of the session handshake: only enrolled devices get through."""
        devices = {n: p for n, p in self.peers.items() if n != SECURITY_COORDINATOR}
        return Responder(self.identity, self.run_id, devices)

    def hello(self, name: str) -> bytes:
        index, head = self.ledger.head
        return json.dumps(
            {
                "run_id": self.run_id,
                "next_seq": self.receiver.last_seq(name) + 1,
                "ledger": [index, head.hex()],
            }
        ).encode()

    def open(
        self, name: str, step: int, wire: bytes, decode: Callable[[bytes], Any] = bytes
    ) -> tuple[Any, int]:
        """Device `name`'s payload for step `step`, opened, decoded and recorded: (what
        `decode` made of it, its `update` entry). Refused (with a `reject` entry) if the
        envelope, its step, its sender or its body (CodecError from `decode`) is wrong."""
        opened = self.receiver.open(wire)
        if isinstance(opened, Opened):
            h = opened.header
            if h.sender != name:
                opened = Rejection(
                    "unknown_sender", h.sender, f"sealed by {h.sender}, sent by {name}"
                )
            elif h.step != step:
                opened = Rejection("replayed", h.sender, f"sealed for step {h.step}")
        value = None
        if isinstance(opened, Opened):
            try:
                value = decode(opened.body)
            except CodecError as e:
                opened = Rejection("malformed", name, str(e))
        if not isinstance(opened, Opened):
            payload = reject_payload(opened, step=step)
            payload["device"] = name  # who sent it, whatever it claimed
            self.rejected.append({**payload, "claimed": opened.sender})
            self.ledger.append(self.identity, "reject", payload)
            raise Refused(f"payload refused ({opened.reason}): {opened.detail}")
        return value, self.ledger.append(self.identity, "update", update_payload(opened))

    def head_json(self) -> bytes:
        index, head = self.ledger.head
        return json.dumps([index, head.hex()]).encode()

    def seal(self, name: str, body: bytes, step: int) -> bytes:
        """`body` sealed for device `name`."""
        return self.sender.seal(self.peers[name], body, step=step, ledger_head=self.ledger.head)

    def aggregate(
        self, step: int, entries: list[int], digest: str, screened: dict[int, str] | None = None
    ) -> None:
        if entries or screened:  # else nothing arrived: an aggregate must name its inputs
            payload = aggregate_payload(step, entries, digest, screened)
            self.ledger.append(self.identity, "aggregate", payload)
        self.steps_aggregated += 1

    def summary(self, digest: str) -> dict[str, Any]:
        """The run's `model_digest` and `security` keys, before `close` (counted in)."""
        out = ledger_summary(self.ledger, self.run_id, self.rejected, digest)
        out["security"]["steps_aggregated"] = self.steps_aggregated
        return out

    def close(self, digest: str) -> None:
        """Close the ledger with `run_end`, once the run folder's model.pt (the model of
        `digest`) and summary.json are written."""
        close_ledger(self.ledger, self.identity, self.run_id, self.out_dir, digest)


class DeviceParty:
    """A device's envelopes; see the module docstring and docs/trust.md."""

    def __init__(self, scenario: Scenario, idx: int, name: str, keys_dir: str = "") -> None:
        """`keys_dir`: the device's own key folder (default: the scenario's)."""
        cfg = scenario.security
        peers = enrolled(cfg)
        fault = [g.envelope_fault for g in scenario.fleet.devices for _ in range(g.count)][idx]
        folder = Path(keys_dir or cfg.keys_dir)
        self.identity = enrolled_identity(folder, name, peers)
        self.signer = impostor(name) if fault == "impostor" else self.identity
        """Who signs its payloads: an impostor signs as an identity nobody enrolled."""
        self.faulty = FaultySender(fault, cfg.max_payload_bytes)
        self.coordinator = pinned_coordinator(folder, peers)
        self.sender: Sender | None = None
        self.receiver: Receiver | None = None
        self.head = NO_LEDGER_HEAD

    def initiator(self) -> Initiator:
        """A new link's side of the session handshake (always as the device itself)."""
        return Initiator(self.identity, self.coordinator)

    def start(self, hello: bytes, run_id: str) -> None:
        """A new session in run `run_id` (what its handshake proved): the coordinator's
        `hello`."""
        info = json.loads(hello)
        if info.get("run_id") != run_id:
            raise CodecError(f"the coordinator's hello names run {info.get('run_id')!r}")
        self.sender = Sender(self.signer, run_id, first_seq=int(info["next_seq"]))
        peers = {SECURITY_COORDINATOR: self.coordinator}
        # The coordinator's answers come inside the session its signed handshake made:
        # that authenticates them (see Receiver); a device keeps no receipts
        self.receiver = Receiver(
            self.identity, run_id, peers, max_payload_bytes=1 << 31, check_signatures=False
        )
        self.saw(info["ledger"])

    def saw(self, head: list[Any]) -> None:
        """The ledger head the coordinator's answer named ([index, hash hex])."""
        self.head = (int(head[0]), bytes.fromhex(str(head[1])))

    def seal(self, body: bytes, step: int) -> bytes:
        assert self.sender is not None, "start() first"
        return self.faulty.seal(self.sender, self.coordinator, body, step, self.head)

    def open(self, wire: bytes, step: int) -> bytes:
        """The coordinator's answer for step `step`; CodecError if it is not genuinely one."""
        assert self.receiver is not None, "start() first"
        opened = self.receiver.open(wire)
        if not isinstance(opened, Opened) or opened.header.step != step:
            raise CodecError(f"the coordinator's answer for step {step} was refused ({opened})")
        self.head = (opened.header.ledger_index, opened.header.ledger_head)
        return opened.body


def pinned_coordinator(folder: Path, peers: dict[str, PublicIdentity]) -> PublicIdentity:
    """The coordinator a device trusts: `coordinator.pub` in its own key folder when it is
    there (the scenario it read from the network must then enroll the same keys), else the
    scenario's (ConfigError for a mismatch or a damaged file)."""
    enrolled_key = peers.get(SECURITY_COORDINATOR)
    _, public = key_paths(folder, SECURITY_COORDINATOR)
    if not public.exists():
        if enrolled_key is None:
            raise ConfigError(f"security.coordinator: not enrolled, and no {public}")
        return enrolled_key
    try:
        pinned = load_public(public)
    except SecurityError as e:
        raise ConfigError(str(e)) from None
    if enrolled_key is None or enrolled_key.to_config() != pinned.to_config():
        raise ConfigError(
            f"{public}: the coordinator's scenario enrolls another coordinator key than this "
            "device trusts; refusing to train for it"
        )
    return pinned
