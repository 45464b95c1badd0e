"""Security on vs off: what sealing and opening a payload costs a device per step.

Goal: <= 5 % of the compute time of one training step on the slowest device profile (rpi4).

With security off a payload costs no cryptography; with it on, a device signs its update
(an envelope) and encrypts it in its session's frame, then decrypts the aggregate's frame
(the session, whose handshake the coordinator signed, authenticates it: no signature check),
every step. So the cost per step is one `Sender.seal` + `Session.seal`
plus one `Session.open` + `Receiver.open` of a payload of that size, timed here on this CPU
(OpenSSL through `cryptography`, one thread; torch limited to one thread too), best of
`--repeats` batches of messages. A session's handshake (two signatures, two verifications,
an X25519 key pair and agreement on each side) is timed too, and amortised over
`--session-steps` steps (a session lasts until its device restarts or its link fails).

The step time is the simulator's own (`Fleet.work_time_s`: fixed per-step cost plus the
share's FLOPs over the profile's FLOP/s) for a Raspberry Pi 4 in the paper fleet: its share of
the global batch of 256 under capability balancing (`balance_shares`), the smallest step a
Pi takes there, so the most demanding denominator. Payloads: the 1-D CNN's dense gradient,
ResNet-32's dense gradient (both float32, as the wire codec sends them), and a two-step
compressed payload of about 1 kB compared against the 1-D CNN's step (the cheaper one).

Caveat: the crypto is timed on this machine's x86 core, the step on a modelled Pi; a Pi 4's
Cortex-A72 runs ChaCha20-Poly1305, SHA-256 and Ed25519 some 3-6x slower (no SHA or AES
extensions it could use here), which the last column estimates with a factor of 5.

    python benchmarks/security_overhead.py          # ~30 s
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import PAPER_FLEET, print_table, write_json  # type: ignore[import-not-found]
from edgeddl import load_scenario, run
from edgeddl.config.loader import read_toml, resolve_path, scenario_from_dict
from edgeddl.fleet.fleet import (
    CRYPTO_BYTE_S,
    CRYPTO_OPEN_S,
    CRYPTO_SEAL_S,
    CRYPTO_VERIFY_S,
    Fleet,
)
from edgeddl.models.cost import cached_model_cost
from edgeddl.models.zoo import build_model
from edgeddl.security.envelope import Opened, Receiver, Sender, overhead_bytes
from edgeddl.security.handshake import Initiator, Responder, Session, handshake_bytes
from edgeddl.security.keys import Identity, save_identity
from edgeddl.strategy.balance import balance_shares

GOAL = 0.05
PI_CRYPTO_SLOWDOWN = 5.0
"""Assumed factor by which a Cortex-A72 is slower at this crypto than this x86 core."""
GLOBAL_BATCH = 256
MODELS = {"cnn1d": (1, 40), "resnet32": (3, 32, 32)}
COMPRESSED_BYTES = 1024
MAX = 1 << 30


def pi_step(model_name: str) -> tuple[float, int, int]:
    """(compute seconds of one step, samples, gradient bytes) for a Pi in the paper fleet."""
    shape = MODELS[model_name]
    model = build_model(model_name, input_shape=shape, num_classes=10)
    cost = cached_model_cost(model, shape)
    fleet = Fleet.from_scenario(load_scenario("paper_fleet"))
    per_sample = cost.train_flops_per_sample / fleet.flops_per_s
    fixed = fleet.fixed_step_s(cost.ops_per_step)
    caps = np.full(len(per_sample), GLOBAL_BATCH, dtype=np.int64)
    shares = balance_shares(GLOBAL_BATCH, per_sample, fixed, caps, "capability")
    pis = [i for i, p in enumerate(fleet.profile_names) if p == "rpi4"]
    pi = min(pis, key=lambda i: shares[i])
    idx = np.asarray([pi])
    flops, ops = cost.train_flops_per_sample, cost.ops_per_step
    _, compute = fleet.work_time_s(idx, shares[idx], flops, 0.0, ops)
    return float(compute[0]), int(shares[pi]), cost.num_params * 4


def _session_pair(device: Identity, coord: Identity) -> tuple[Session, Session]:
    initiator = Initiator(device, coord.public())
    responder = Responder(coord, "bench", {device.name: device.public()})
    confirm, mine = initiator.confirm(responder.reply(initiator.hello()))
    return mine, responder.accept(confirm)


def handshake_s(repeats: int) -> dict[str, float]:
    """Best seconds of one session handshake: the device's side (hello, checking the reply,
    its confirm) and the coordinator's (its reply, checking the confirm)."""
    device, coord = Identity.generate("rpi4-0"), Identity.generate("coordinator")
    best = {"device": float("inf"), "coordinator": float("inf")}
    for _ in range(repeats * 20):
        t0 = time.perf_counter()
        initiator = Initiator(device, coord.public())
        hello = initiator.hello()
        t1 = time.perf_counter()
        responder = Responder(coord, "bench", {device.name: device.public()})
        reply = responder.reply(hello)
        t2 = time.perf_counter()
        confirm, _ = initiator.confirm(reply)
        t3 = time.perf_counter()
        responder.accept(confirm)
        t4 = time.perf_counter()
        best["device"] = min(best["device"], (t1 - t0) + (t3 - t2))
        best["coordinator"] = min(best["coordinator"], (t2 - t1) + (t4 - t3))
    return best


def crypto_s(body_bytes: int, repeats: int) -> dict[str, float]:
    """Best seconds, per message of `body_bytes`, for: the device sealing its update
    (`seal`: sign, then its session's frame), the device opening the coordinator's answer
    (`device_open`: the frame; the session authenticates it) and the coordinator opening a
    device's update (`coordinator_open`: the frame and the signature, for the ledger's
    receipt)."""
    device, coord = Identity.generate("rpi4-0"), Identity.generate("coordinator")
    body = np.random.default_rng(0).bytes(body_bytes)
    n = max(5, min(400, 4_000_000 // max(body_bytes, 1)))
    best = {"seal": float("inf"), "device_open": float("inf"), "coordinator_open": float("inf")}
    for _ in range(repeats):
        mine, theirs = _session_pair(device, coord)
        up, down = Sender(device, "bench"), Sender(coord, "bench")
        at_coord = Receiver(coord, "bench", {device.name: device.public()}, max_payload_bytes=MAX)
        at_device = Receiver(
            device,
            "bench",
            {coord.name: coord.public()},
            max_payload_bytes=MAX,
            check_signatures=False,  # the session authenticates the coordinator
        )
        wires = [theirs.seal(down.seal(device.public(), body, step=i)) for i in range(n)]
        t0 = time.perf_counter()
        sealed = [mine.seal(up.seal(coord.public(), body, step=i)) for i in range(n)]
        t1 = time.perf_counter()
        opened = [at_coord.open(theirs.open(w)) for w in sealed]
        t2 = time.perf_counter()
        answers = [at_device.open(mine.open(w)) for w in wires]
        t3 = time.perf_counter()
        assert all(isinstance(o, Opened) and o.body == body for o in opened + answers)
        for key, secs in (
            ("seal", t1 - t0),
            ("coordinator_open", t2 - t1),
            ("device_open", t3 - t2),
        ):
            best[key] = min(best[key], secs / n)
    return best


def simulated_steps(model_name: str, steps: int) -> dict[str, float]:
    """Virtual seconds per step of the paper fleet (LAN; the 1-D CNN on MNIST-1D, or
    ResNet-32 on CIFAR-shaped synthetic data), security off and on: the simulator's whole
    step, with its crypto model (devices: `Fleet.crypto_seconds`; the coordinator opening
    each update as it arrives and sealing each answer) and the envelopes' bytes."""
    raw = read_toml(resolve_path(PAPER_FLEET))
    raw["train"].update(num_steps=steps, eval_every=steps)
    raw["model"] = {"name": model_name}
    if model_name == "resnet32":
        raw["data"] = {
            "dataset": "synthetic",
            "input_shape": list(MODELS[model_name]),
            "num_samples": 2048,
        }
    raw["run"]["threads"] = 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = Fleet.from_scenario(scenario_from_dict(raw)).names

        def enroll(name: str) -> dict[str, str]:
            identity = Identity.generate(name)
            save_identity(identity, folder)
            return dataclasses.asdict(identity.public().to_config())

        security = {
            "enabled": True,
            "keys_dir": str(folder),
            "coordinator": enroll("coordinator"),
            "devices": {n: enroll(n) for n in names},
        }
        for label, extra in (("off", {}), ("on", {"security": security})):
            scenario = scenario_from_dict({**raw, **extra})
            result = run(scenario, out_dir=folder / label, progress=False)
            out[label] = result.summary["virtual_time_s"] / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="simulated 1-D CNN steps, each side")
    p.add_argument("--resnet-steps", type=int, default=3, help="simulated ResNet-32 steps")
    p.add_argument(
        "--session-steps",
        type=int,
        default=100,
        help="steps a session lasts, over which its handshake is amortised (default 100)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args()
    torch.set_num_threads(1)
    steps = {m: pi_step(m) for m in MODELS}
    cases = [
        ("cnn1d dense", "cnn1d", steps["cnn1d"][2]),
        ("resnet32 dense", "resnet32", steps["resnet32"][2]),
        ("two_step ~1 kB", "cnn1d", COMPRESSED_BYTES),
    ]
    extra = overhead_bytes("bench", "rpi4-0", "coordinator")
    empty = crypto_s(0, args.repeats)
    hs = handshake_s(args.repeats)
    hello_up, hello_down = handshake_bytes("bench", "rpi4-0", "coordinator")
    print(
        f"session handshake: device {hs['device'] * 1e3:.3f} ms, coordinator "
        f"{hs['coordinator'] * 1e3:.3f} ms; {hello_up} B up, {hello_down} B down; "
        f"amortised over {args.session_steps} steps"
    )
    amortised = hs["device"] / args.session_steps
    rows, results = [], []
    for label, model_name, body in cases:
        step_s, samples, _ = steps[model_name]
        t = crypto_s(body, args.repeats)
        device_s = t["seal"] + t["device_open"] + amortised
        ratio = device_s / step_s
        results.append(
            {
                "payload": label,
                "body_bytes": body,
                "overhead_bytes": extra,
                **{f"{k}_s": v for k, v in t.items()},
                "device_s": device_s,
                "step_model": model_name,
                "pi_samples": samples,
                "pi_step_s": step_s,
                "ratio": ratio,
                "ratio_pi_estimate": ratio * PI_CRYPTO_SLOWDOWN,
            }
        )
        rows.append(
            [
                label,
                f"{body:,}",
                f"{extra} ({extra / body:.2%})",
                f"{t['seal'] * 1e6:.0f} + {t['device_open'] * 1e6:.0f} + {amortised * 1e6:.0f}",
                f"{t['coordinator_open'] * 1e6:.0f}",
                f"{model_name}, {samples} samples: {step_s * 1e3:.2f}",
                f"{ratio:.2%}",
                f"{ratio * PI_CRYPTO_SLOWDOWN:.1%}",
            ]
        )
    print_table(
        f"security on vs off, a device's crypto per step on rpi4 (goal <= {GOAL:.0%})",
        [
            "payload",
            "body B",
            "envelope B",
            "device seal + open + handshake/steps us",
            "coordinator open us",
            "rpi4 step ms (compute)",
            "crypto/step",
            "x5 (Pi crypto)",
        ],
        rows,
    )
    # The simulator's crypto model, fitted here: empty envelopes, then per body byte
    # (sealed and opened) from the largest payload.
    big = max(results, key=lambda r: r["body_bytes"])
    per_byte = big["seal_s"] + big["device_open_s"] - empty["seal"] - empty["device_open"]
    fitted = {
        "seal_s": empty["seal"],
        "open_s": empty["device_open"],
        "verify_s": empty["coordinator_open"] - empty["device_open"],
        "byte_s": per_byte / big["body_bytes"],
    }
    model = {
        "seal_s": CRYPTO_SEAL_S,
        "open_s": CRYPTO_OPEN_S,
        "verify_s": CRYPTO_VERIFY_S,
        "byte_s": CRYPTO_BYTE_S,
    }
    print(
        "fitted (simulator's constant): "
        + ", ".join(
            f"{k} {fitted[k] * (1e9 if k == 'byte_s' else 1e6):.1f} "
            f"({model[k] * (1e9 if k == 'byte_s' else 1e6):.1f})"
            for k in fitted
        )
        + " us; byte_s in ns"
    )
    worst = max(r["ratio"] for r in results)
    sim = {"cnn1d": simulated_steps("cnn1d", args.steps)}
    sim["resnet32"] = simulated_steps("resnet32", args.resnet_steps)
    for model_name, t in sim.items():
        t["ratio"] = t["on"] / t["off"] - 1
        print(
            f"simulated paper fleet ({model_name}, LAN), whole step: {t['off'] * 1e3:.2f} ms "
            f"off, {t['on'] * 1e3:.2f} ms on: {t['ratio']:+.2%}"
        )
    print(
        f"worst crypto/step (compute only) {worst:.2%}: "
        f"{'meets' if worst <= GOAL else 'misses'} the goal of {GOAL:.0%}"
    )
    if args.json:
        write_json(
            args.json,
            {
                "goal": GOAL,
                "empty_envelope": empty,
                "handshake_s": hs,
                "handshake_bytes": {"up": hello_up, "down": hello_down},
                "session_steps": args.session_steps,
                "fitted": fitted,
                "simulator_constants": model,
                "results": results,
                "simulated_step_s": sim,
            },
        )


if __name__ == "__main__":
    main()
