"""Privacy-preserving modes side by side: centralized, data-parallel, FedAvg, FedProx, split
and SplitFed on MNIST-1D, IID and Dirichlet (alpha 0.3), on the paper fleet over LAN and LTE.

Every mode trains the 1-D CNN on the same number of samples (the data-parallel steps times
the global batch; federated rounds of every client's local steps; split steps). Reported per
mode: final test accuracy, mean bytes up and down per device, virtual time, and the foil:
the bytes each device would upload to ship its raw shard to the coordinator.

* centralized: every device uploads its raw shard (concurrently, through the coordinator's
  downlink), then the coordinator trains alone (its profile) on everything: the time is the
  upload plus that training run's virtual time;
* data_parallel: synchronous SGD, gradients up and the model down every step;
* fedavg / fedprox: every client each round, 10 local steps of 32 at lr 0.1 (FedProx mu
  0.01);
* split: the front (conv + ReLU) on each device, activations and labels up, gradients down;
* splitfed: the same, with the fronts averaged every step.

    python benchmarks/privacy_modes.py                 # about 10 minutes on 2 cores
    python benchmarks/privacy_modes.py --steps 100     # a quick look

Results: benchmarks/results/privacy_modes.json and privacy_modes.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

import edgeddl
from common import console, machine_info, warn_if_busy
from edgeddl import Scenario, load_scenario
from edgeddl.config.loader import scenario_from_dict
from edgeddl.fleet.fleet import Fleet
from edgeddl.io import write_json_atomic
from edgeddl.workload import build_workload

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("centralized", "data_parallel", "fedavg", "fedprox", "split", "splitfed")
PARTITIONS = {"iid": [], "dirichlet": ["data.partition=dirichlet", "data.alpha=0.3"]}
LINKS = ("lan", "lte")
GLOBAL_BATCH = 128
LOCAL_STEPS, LOCAL_BATCH = 10, 32
FEDERATED_LR = 0.1
"""Local SGD's learning rate (train.lr, 0.05, for the others): a round's 10 small steps
from a fresh optimizer want a larger one."""
NUM_DEVICES = 11


def _base(steps: int, link: str, partition: str) -> list[str]:
    sets = [
        f"train.global_batch={GLOBAL_BATCH}",
        f"train.num_steps={steps}",
        f"train.eval_every={steps}",
        "run.name=privacy",
        *PARTITIONS[partition],
    ]
    return sets + [f"fleet.devices.{i}.link={link}" for i in range(3)]


def _mode(mode: str, steps: int) -> list[str]:
    """The scenario settings of a mode, for the same number of samples as `steps` steps."""
    if mode == "data_parallel":
        return []
    if mode in ("fedavg", "fedprox"):
        rounds = max(1, round(steps * GLOBAL_BATCH / (NUM_DEVICES * LOCAL_STEPS * LOCAL_BATCH)))
        return [
            "train.strategy=federated",
            f"train.num_steps={rounds}",
            f"train.eval_every={rounds}",
            f"federated.local_steps={LOCAL_STEPS}",
            f"federated.local_batch={LOCAL_BATCH}",
            f"federated.local_lr={FEDERATED_LR}",
            f"federated.proximal_mu={0.01 if mode == 'fedprox' else 0.0}",
        ]
    if mode in ("split", "splitfed"):
        flag = str(mode == "splitfed").lower()
        return ["train.strategy=split", "split.cut=1", f"split.splitfed={flag}"]
    raise ValueError(mode)


def _raw_upload_s(scenario: Scenario, shard_bytes: np.ndarray) -> float:
    """Every device ships its raw shard at once; the coordinator's downlink is shared."""
    fleet = Fleet.from_scenario(scenario)
    c = fleet.coordinator_link
    own = fleet.latency_s + c.latency_s + 8 * shard_bytes / np.minimum(fleet.up_bps, c.down_bps)
    return float(max(own.max(), 8 * shard_bytes.sum() / c.down_bps))


def _centralized(scenario: Scenario, shard_bytes: np.ndarray, out: Path) -> dict[str, Any]:
    """The coordinator trains alone on every sample, after the raw data came up."""
    raw = dataclasses.asdict(scenario)
    coord = raw["fleet"]["coordinator"]
    raw["fleet"]["devices"] = [{"name": "coordinator", **coord, "count": 1}]
    raw["data"]["partition"] = "iid"
    s = edgeddl.run(scenario_from_dict(raw), out_dir=out, progress=False).summary
    upload_s = _raw_upload_s(scenario, shard_bytes)
    return {
        "accuracy": s["final_test_accuracy"],
        "up_per_device": float(shard_bytes.mean()),
        "down_per_device": 0.0,
        "virtual_time_s": upload_s + s["virtual_time_s"],
        "raw_upload_s": upload_s,
    }


def _shard_bytes(scenario: Scenario) -> np.ndarray:
    """Each device's raw shard in bytes, as the data set stores its samples."""
    w = build_workload(scenario)
    return np.array([len(s) for s in w.shards], dtype=np.float64) * w.info.sample_bytes


def run(steps: int, out_root: Path) -> list[dict[str, Any]]:
    rows = []
    for partition in PARTITIONS:
        for link in LINKS:
            base = _base(steps, link, partition)
            scenario = load_scenario("paper_fleet", base)
            shards = _shard_bytes(scenario)
            for mode in MODES:
                start = time.perf_counter()
                out = out_root / f"{mode}-{partition}-{link}"
                if mode == "centralized":
                    row = _centralized(scenario, shards, out)
                else:
                    s = edgeddl.run(
                        load_scenario("paper_fleet", [*base, *_mode(mode, steps)]),
                        out_dir=out,
                        progress=False,
                    ).summary
                    n = len(s["per_device"])
                    row = {
                        "accuracy": s["final_test_accuracy"],
                        "up_per_device": s["bytes_up"] / n,
                        "down_per_device": s["bytes_down"] / n,
                        "virtual_time_s": s["virtual_time_s"],
                        "samples": s["samples"],
                    }
                row.update(
                    mode=mode,
                    partition=partition,
                    link=link,
                    raw_shard_per_device=float(shards.mean()),
                    wall_s=time.perf_counter() - start,
                )
                rows.append(row)
                console.print(
                    f"{partition:9} {link:4} {mode:13} acc {row['accuracy']:.3f}  "
                    f"up {row['up_per_device'] / 1e6:8.2f} MB  "
                    f"time {row['virtual_time_s']:8.2f} s  ({row['wall_s']:.0f} s wall)"
                )
    return rows


def _find(rows: list[dict[str, Any]], mode: str, partition: str, link: str) -> dict[str, Any]:
    return next(
        r for r in rows if (r["mode"], r["partition"], r["link"]) == (mode, partition, link)
    )


def _table(rows: list[dict[str, Any]]) -> None:
    for partition in PARTITIONS:
        table = Table(
            "mode",
            "accuracy",
            "up MB/device",
            "down MB/device",
            "up / raw shard",
            "time LAN s",
            "time LTE s",
            title=f"MNIST-1D, 1-D CNN, paper fleet (11 devices), {partition}",
        )
        for mode in MODES:
            lan, lte = (_find(rows, mode, partition, k) for k in LINKS)
            table.add_row(
                mode,
                f"{lan['accuracy']:.3f}",
                f"{lan['up_per_device'] / 1e6:.2f}",
                f"{lan['down_per_device'] / 1e6:.2f}",
                f"{lan['up_per_device'] / lan['raw_shard_per_device']:.1f}x",
                f"{lan['virtual_time_s']:.2f}",
                f"{lte['virtual_time_s']:.2f}",
            )
        console.print(table)
        shard = rows[0]["raw_shard_per_device"]
        console.print(f"raw shard per device (the foil): {shard / 1e3:.0f} kB")
        for key, label, best in (
            ("accuracy", "best accuracy", max),
            ("up_per_device", "fewest bytes up", min),
        ):
            picks = [r for r in rows if r["partition"] == partition and r["link"] == "lan"]
            console.print(f"  {label}: {best(picks, key=lambda r: r[key])['mode']}")
        for link in LINKS:
            picks = [r for r in rows if r["partition"] == partition and r["link"] == link]
            fastest = min(picks, key=lambda r: r["virtual_time_s"])["mode"]
            console.print(f"  fastest on {link}: {fastest}")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(MODES))
    for i, partition in enumerate(PARTITIONS):
        acc = [_find(rows, m, partition, "lan")["accuracy"] for m in MODES]
        axes[0].bar(x + (i - 0.5) * 0.4, acc, 0.4, label=partition)
    for i, link in enumerate(LINKS):
        up = [_find(rows, m, "iid", link)["up_per_device"] for m in MODES]
        t = [_find(rows, m, "iid", link)["virtual_time_s"] for m in MODES]
        if i == 0:
            axes[1].bar(x, np.array(up) / 1e6, 0.6)
        axes[2].bar(x + (i - 0.5) * 0.4, t, 0.4, label=link.upper())
    shard = rows[0]["raw_shard_per_device"] / 1e6
    axes[1].axhline(shard, color="k", linestyle="--", label="raw shard (foil)")
    titles = ("test accuracy", "MB up per device (IID)", "virtual time, IID (s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(x, MODES, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="data-parallel steps (default 400)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgeddl-privacy-modes"))
    args = parser.parse_args()
    warn_if_busy()
    rows = run(args.steps, args.out)
    _table(rows)
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(
        RESULTS / "privacy_modes.json",
        {"machine": machine_info(0), "steps": args.steps, "rows": rows},
    )
    _plot(rows, RESULTS / "privacy_modes.png")
    console.print(f"wrote {RESULTS / 'privacy_modes.json'} and privacy_modes.png")


if __name__ == "__main__":
    main()
