"""Typed scenario configuration: one dataclass per section of a scenario file.

Every field has a default that makes sense on its own, a docstring, and a check in
``__post_init__`` that raises ``ValueError`` with a message naming the field and what is
allowed. The loader (``edgeddl.config.loader``) prefixes the section path, so a user sees
``train.global_batch: must be >= 1 (got 0)``. This module must not import torch. The larger
sections live beside it (`compression.py`, `federated.py`, `split.py`, `security.py`);
`Scenario` here puts them together.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from edgeddl.config.checks import require as _require
from edgeddl.config.compression import CompressionConfig
from edgeddl.config.federated import FederatedConfig
from edgeddl.config.robust import BehaviorName, RobustConfig, check_behavior
from edgeddl.config.security import SecurityConfig
from edgeddl.config.split import SplitConfig

DatasetName = Literal["mnist1d", "digits", "cifar10", "synthetic", "sensors"]
PartitionName = Literal["iid", "dirichlet"]
ModelName = Literal["mlp", "cnn1d", "cnn1d_bn", "resnet20", "resnet32", "resnet56", "autoencoder1d"]
TaskName = Literal["classification", "anomaly_detection"]
ANOMALY_DATASETS = ("sensors",)
"""Data sets for anomaly detection: normal training series, a test set labelled 1 = anomaly."""
RECONSTRUCTION_MODELS = ("autoencoder1d",)
"""Models whose output has the input's shape (what anomaly detection trains)."""


def dataset_task(dataset: str) -> TaskName:
    """What a run on `dataset` learns: anomaly detection for `ANOMALY_DATASETS`, else
    classification."""
    return "anomaly_detection" if dataset in ANOMALY_DATASETS else "classification"


MAX_DEVICES = 100_000
"""More simulated devices than this in one group is surely a typo."""


@dataclass(kw_only=True, slots=True)
class DeviceProfile:
    """How fast one class of device trains, and what it can hold."""

    flops_per_s: float
    """Effective training throughput in FLOP/s (forward + backward), not the datasheet peak."""
    memory_bytes: float
    """Memory available to training (parameters, gradients, optimizer state, activations)."""
    step_overhead_s: float = 0.0
    """Fixed cost of one training step whatever its batch and model (loop, data hand-off)."""
    op_overhead_s: float = 0.0
    """Cost of dispatching one operator (framework, kernel launch), times the model's count."""
    io_bytes_per_s: float = 100e6
    """Sustained read throughput of the device's storage, for data-loading time."""
    source: str = ""
    """Where the numbers come from: a paper, a datasheet, or `edgeddl calibrate`."""

    def __post_init__(self) -> None:
        _require(self.flops_per_s > 0, f"flops_per_s must be > 0 (got {self.flops_per_s})")
        _require(self.memory_bytes > 0, f"memory_bytes must be > 0 (got {self.memory_bytes})")
        _require(self.step_overhead_s >= 0, "step_overhead_s must be >= 0")
        _require(self.op_overhead_s >= 0, "op_overhead_s must be >= 0")
        _require(self.io_bytes_per_s > 0, f"io_bytes_per_s must be > 0 (got {self.io_bytes_per_s})")


@dataclass(kw_only=True, slots=True)
class LinkProfile:
    """One device's network link to the rest of the fleet."""

    up_bps: float
    """Uplink bandwidth in bit/s."""
    down_bps: float
    """Downlink bandwidth in bit/s."""
    latency_s: float = 0.0
    """One-way latency in seconds."""
    jitter_s: float = 0.0
    """Mean extra one-way delay per transfer, drawn from an exponential distribution."""
    loss: float = 0.0
    """Packet loss probability; each lost packet is resent and costs one round trip."""
    source: str = ""
    """Where the numbers come from."""

    def __post_init__(self) -> None:
        _require(self.up_bps > 0, f"up_bps must be > 0 bit/s (got {self.up_bps})")
        _require(self.down_bps > 0, f"down_bps must be > 0 bit/s (got {self.down_bps})")
        _require(self.latency_s >= 0, f"latency_s must be >= 0 (got {self.latency_s})")
        _require(self.jitter_s >= 0, f"jitter_s must be >= 0 (got {self.jitter_s})")
        _require(0 <= self.loss < 1, f"loss must be in [0, 1) (got {self.loss})")


@dataclass(kw_only=True, slots=True)
class DeviceGroup:
    """One device, or `count` identical devices named NAME-0 .. NAME-(count-1)."""

    name: str
    profile: str
    """A built-in device profile (`edgeddl profiles` lists them) or one from [profiles]."""
    link: str = "lan"
    """A built-in link profile or one from [links]."""
    count: int = 1
    behavior: BehaviorName = "honest"
    """What the group's devices send (simulator; real fleet with [security]): honest;
    sign_flip: -update; scaled: update * behavior_scale; noise: Gaussian noise of std
    behavior_scale times the honest update's RMS, instead of it; label_flip: an honest
    update trained on labels y -> C-1-y; free_rider: zeros (its samples still claimed);
    nan: NaN values (a broken device)."""
    behavior_scale: float = 1.0
    """The factor of `scaled`, the relative std of `noise`; 1 for the other behaviours."""
    envelope_fault: Literal[
        "none", "forged_signature", "tampered", "replayed", "oversized", "impostor"
    ] = "none"
    """With [security] (simulator and real fleet): what goes wrong with the group's sealed
    payloads: signed by another key, a ciphertext byte flipped, the previous payload sent
    again, past max_payload_bytes, or sealed by an identity nobody enrolled. The coordinator
    refuses each with its reason and trains on without it."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name must not be empty")
        _require(
            1 <= self.count <= MAX_DEVICES, f"count must be in 1..{MAX_DEVICES} (got {self.count})"
        )
        check_behavior(self.behavior, self.behavior_scale)

    def device_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]


@dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    """The node that schedules steps and, in the star topology, aggregates."""

    profile: str = "pc"
    link: str = "lan"


@dataclass(kw_only=True, slots=True)
class FleetConfig:
    devices: list[DeviceGroup] = field(default_factory=list)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    step_sync_s: float = 0.0
    """Fixed coordination cost of every synchronous step on a real engine (torchft's quorum
    and commit round trips, the processes' own overhead), beyond moving the payloads; 0 for
    an ideal one. `benchmarks/calibration.py` measures it for its fleet (8-18 ms for four
    device processes on 127.0.0.1 here; it grows with the processes sharing the cores)."""
    failure_detection_s: float = 1.0
    """Time for the others to notice a crashed device (torchft heartbeat measured here: 1.1 s)."""

    def __post_init__(self) -> None:
        _require(len(self.devices) > 0, "devices must list at least one device")
        _require(self.failure_detection_s >= 0, "failure_detection_s must be >= 0")
        _require(self.step_sync_s >= 0, f"step_sync_s must be >= 0 (got {self.step_sync_s})")
        # Group names share the namespace: an event naming `pc-0` must mean one thing.
        counts = Counter(n for g in self.devices for n in g.device_names())
        counts.update(g.name for g in self.devices if g.count > 1)
        dup = sorted(n for n, k in counts.items() if k > 1)
        _require(not dup, f"devices: duplicate device or group name(s) {dup[:10]}")

    def device_names(self) -> list[str]:
        return [n for g in self.devices for n in g.device_names()]


@dataclass(kw_only=True, slots=True)
class EventConfig:
    """A membership change at a virtual time: a device leaves, joins, or crashes."""

    at_s: float
    device: str
    """A device name, or a group name for every device of the group."""
    action: Literal["leave", "join", "crash"]

    def __post_init__(self) -> None:
        _require(self.at_s >= 0, f"at_s must be >= 0 (got {self.at_s})")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    dataset: DatasetName = "mnist1d"
    root: str = ""
    """Folder of a local data set (CIFAR-10 in its python format); nothing is downloaded."""
    num_samples: int = 0
    """Samples to generate (mnist1d, synthetic; sensors: training series); 0 keeps the data
    set's default."""
    input_shape: list[int] = field(default_factory=list)
    """Sample shape for `synthetic`, channel-first; empty for its default (1, 40)."""
    num_classes: int = 10
    """Classes for `synthetic`."""
    partition: PartitionName = "iid"
    alpha: float = 0.5
    """Dirichlet concentration for `partition = "dirichlet"`: small is more skewed."""
    shard_sizes: Literal["equal", "capability"] = "equal"
    """Equal shards per device, or shards proportional to each device's training speed."""

    def __post_init__(self) -> None:
        _require(self.num_samples >= 0, f"num_samples must be >= 0 (got {self.num_samples})")
        _require(self.alpha > 0, f"alpha must be > 0 (got {self.alpha})")
        _require(self.num_classes >= 2, f"num_classes must be >= 2 (got {self.num_classes})")
        _require(all(d >= 1 for d in self.input_shape), "input_shape entries must be >= 1")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: ModelName = "cnn1d"
    width: int = 0
    """Model width (hidden units, channels); 0 keeps the model's default."""

    def __post_init__(self) -> None:
        _require(0 <= self.width <= 4096, f"width must be in 0..4096 (got {self.width})")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    strategy: Literal["data_parallel", "federated", "split"] = "data_parallel"
    """data_parallel: synchronous SGD over a global batch; federated: rounds of local
    training on sampled clients, their updates averaged on the server ([federated]); a step
    of the loop is then a round (num_steps rounds, eval_every rounds); split: each device
    trains the front of the model, the coordinator the rear ([split])."""
    topology: Literal["star", "ring"] = "star"
    """star: a parameter server on the coordinator; ring: all-reduce among the devices."""
    balance: Literal["capability", "min_time", "equal"] = "capability"
    """capability: shares proportional to device speed; min_time: shares that minimise the
    step time given fixed per-step costs (a device whose fixed costs exceed the step gets no
    samples, and its data goes unused); equal: the foil."""
    global_batch: int = 256
    num_steps: int = 300
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 25
    """Evaluate on the test set every this many steps (and after the last)."""
    max_virtual_time_s: float = 0.0
    """Stop once virtual time passes this; 0 for no limit."""

    def __post_init__(self) -> None:
        _require(self.global_batch >= 1, f"global_batch must be >= 1 (got {self.global_batch})")
        _require(self.num_steps >= 1, f"num_steps must be >= 1 (got {self.num_steps})")
        _require(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})")
        _require(self.weight_decay >= 0, "weight_decay must be >= 0")
        _require(self.eval_every >= 1, f"eval_every must be >= 1 (got {self.eval_every})")
        _require(self.max_virtual_time_s >= 0, "max_virtual_time_s must be >= 0")
        _require(
            self.strategy == "data_parallel" or self.topology == "star",
            f"topology: {self.strategy} learning needs its server on the coordinator; "
            'set topology = "star"',
        )


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    threads: int = 0
    """torch CPU threads; 0: automatic, from the model's work per pass and the cores (one
    thread for small models, which lose most to threads on a busy machine). A run's bits
    depend on this number, never on the machine's load."""
    checkpoint_every: int = 100
    """Simulator: write RUN/checkpoint.pkl every this many steps (and always when a run is
    interrupted), for `edgeddl run --resume RUN`; 0: only on interruption."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the simulator does the maths (the simulated devices' speeds come from profiles)."""
    exchange: str = "network"
    """How the simulator carries a step: `network`, the simulated links (or a name
    registered with `edgeddl.runtime.sim.exchange.register_exchange`)."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name must not be empty")
        _require(
            "/" not in self.name and "\\" not in self.name and not self.name.startswith("."),
            f"name must be a plain folder name, without / or a leading dot (got {self.name!r})",
        )
        _require(0 <= self.seed < 2**32, f"seed must be in 0..2**32-1 (got {self.seed})")
        _require(0 <= self.threads <= 1024, f"threads must be in 0..1024 (got {self.threads})")
        _require(
            self.checkpoint_every >= 0,
            f"checkpoint_every must be >= 0 (got {self.checkpoint_every})",
        )


@dataclass(kw_only=True, slots=True)
class Scenario:
    """A whole job: the fleet, the data, the model, how to train, and what happens when."""

    run: RunConfig = field(default_factory=RunConfig)
    fleet: FleetConfig
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    events: list[EventConfig] = field(default_factory=list)
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    """Device profiles of your own, beside the built-ins (`edgeddl calibrate` writes one)."""
    links: dict[str, LinkProfile] = field(default_factory=dict)
    """Link profiles of your own, beside the built-ins."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    @property
    def task(self) -> TaskName:
        """What the run learns and how it is scored, from the data set: classification
        (cross-entropy, accuracy) or anomaly detection (reconstruction error, AUROC)."""
        return dataset_task(self.data.dataset)

    def __post_init__(self) -> None:
        self._check_task()
        # Lazy: the catalog lives in the fleet layer, which builds on these classes.
        from edgeddl.config.profiles import DEVICE_PROFILES, LINK_PROFILES

        devices = {**DEVICE_PROFILES, **self.profiles}
        links = {**LINK_PROFILES, **self.links}
        nodes = [
            (f"fleet.devices[{i}]", g.profile, g.link) for i, g in enumerate(self.fleet.devices)
        ]
        nodes.append(
            ("fleet.coordinator", self.fleet.coordinator.profile, self.fleet.coordinator.link)
        )
        for where, profile, link in nodes:
            _require(
                profile in devices,
                f"{where}.profile: unknown profile {profile!r}; "
                f"allowed: {', '.join(sorted(devices))}",
            )
            _require(
                link in links,
                f"{where}.link: unknown link {link!r}; allowed: {', '.join(sorted(links))}",
            )
        self._check_events()
        for i, g in enumerate(self.fleet.devices):
            _require(
                g.envelope_fault == "none" or self.security.enabled,
                f"fleet.devices[{i}].envelope_fault: {g.envelope_fault} needs sealed payloads; "
                "set security.enabled = true",
            )
        self._check_robust()
        self.security.check_devices(self.fleet.device_names())
        names = set(self.fleet.device_names()) | {g.name for g in self.fleet.devices}
        for key in self.compression.groups:
            _require(
                key in names,
                f"compression.groups.{key}: unknown group or device; allowed: a group or "
                "device name from [fleet]",
            )

    def _check_task(self) -> None:
        name, dataset = self.model.name, self.data.dataset
        if self.task == "anomaly_detection":
            _require(
                name in RECONSTRUCTION_MODELS,
                f"model.name: {name!r} is a classifier, but data.dataset {dataset!r} is for "
                f"anomaly detection; allowed: {', '.join(RECONSTRUCTION_MODELS)}",
            )
        else:
            _require(
                name not in RECONSTRUCTION_MODELS,
                f"model.name: {name!r} reconstructs its input, for anomaly detection, but "
                f"data.dataset {dataset!r} is for classification; use it with "
                f"{', '.join(repr(d) for d in ANOMALY_DATASETS)}",
            )

    @property
    def misbehaving(self) -> bool:
        """Whether any device of the fleet is set to misbehave."""
        return any(g.behavior != "honest" for g in self.fleet.devices)

    def _check_robust(self) -> None:
        """The rule fits the strategy, the topology and the number of devices taking part."""
        r, t = self.robust, self.train
        if t.strategy == "split":
            _require(
                not r.screens and not self.misbehaving,
                "robust: split learning sends activations, not updates to aggregate; leave "
                '[robust] at rule = "mean" and every device honest',
            )
            return
        _require(
            not r.screens or t.topology == "star",
            f"robust.rule: {r.rule} (and the screen) needs a server to see each update; "
            'set train.topology = "star" or rule = "mean" with max_update_norm = 0',
        )
        for i, g in enumerate(self.fleet.devices):
            _require(
                g.behavior != "label_flip" or self.task == "classification",
                f"fleet.devices[{i}].behavior: label_flip needs class labels, but "
                f"data.dataset {self.data.dataset!r} is for anomaly detection",
            )
        r.check_training(t.strategy, self.compression.enabled, t.momentum)
        n = len(self.fleet.device_names())
        if t.strategy == "federated":
            sampled = min(n, max(1, int(self.federated.fraction * n + 0.5)))
            r.check_fleet(sampled, f"federated.fraction {self.federated.fraction:g} of {n}")
        else:
            r.check_fleet(n, "the fleet")

    def _check_events(self) -> None:
        groups = {g.name: g.device_names() for g in self.fleet.devices}
        ordered = sorted(enumerate(self.events), key=lambda p: p[1].at_s)
        present: dict[str, bool] = {}
        for _, e in reversed(ordered):  # a device whose first event is a join starts absent
            for name in self.event_devices(e, groups):
                present[name] = e.action != "join"
        for name in self.fleet.device_names():
            present.setdefault(name, True)
        for i, e in ordered:
            targets = self.event_devices(e, groups)
            _require(
                bool(targets),
                f"events[{i}].device: unknown device {e.device!r}; "
                f"allowed: a device or group name from [fleet]",
            )
            for name in targets:
                if e.action == "join":
                    _require(
                        not present[name],
                        f"events: {name!r} joins at {e.at_s} s but is already in the fleet then",
                    )
                else:
                    _require(
                        present[name],
                        f"events: {name!r} cannot {e.action} at "
                        f"{e.at_s} s: it is not in the fleet then",
                    )
                present[name] = e.action == "join"

    @staticmethod
    def event_devices(event: EventConfig, groups: dict[str, list[str]]) -> list[str]:
        if event.device in groups:
            return groups[event.device]
        prefix, _, index = event.device.rpartition("-")
        members = groups.get(prefix, ())
        if index.isdigit() and int(index) < len(members) and len(members) > 1:
            return [event.device]
        return []
