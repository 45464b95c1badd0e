"""Built-in device and link profiles, each number with where it comes from.

Device speeds are effective *training* FLOP/s, calibrated from published training throughputs
of ResNet-32 on CIFAR-10 through the model's measured training cost
(`RESNET32_TRAIN_FLOPS_PER_SAMPLE`, checked against `edgeddl.models.model_cost` by a test).
A model's simulated compute time is then its own measured FLOPs divided by these rates, so it
does not depend on how busy the simulating machine is. Numbers marked *estimate* have no
direct measurement behind them; `edgeddl calibrate` writes a measured profile of this machine.
"""

from __future__ import annotations

from edgeddl.config.schema import DeviceProfile, LinkProfile

RESNET32_TRAIN_FLOPS_PER_SAMPLE = 4.1229e8
"""Forward + backward FLOPs of one 3x32x32 sample through ResNet-32 (FlopCounterMode)."""

GiB = 1024**3


def _from_resnet32(img_per_s: float) -> float:
    return img_per_s * RESNET32_TRAIN_FLOPS_PER_SAMPLE


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "rpi4": DeviceProfile(
        # Jin et al. 2021 (FGCS 125): 11 devices reach 200.4 img/s, 8.44x a standalone Pi 4,
        # so a Pi 4 trains ResNet-32 at 200.4 / 8.44 = 23.7 img/s.
        flops_per_s=_from_resnet32(23.7),
        memory_bytes=4 * GiB,  # Raspberry Pi 4 Model B, 4 GB variant
        step_overhead_s=0.001,  # estimate: Python loop and data hand-off
        op_overhead_s=40e-6,  # estimate: 3-4x the ~10-20 us/op measured here, Cortex-A72
        io_bytes_per_s=45e6,  # A1-class microSD sequential read
        source="Jin et al. 2021 (23.7 img/s ResNet-32); overhead estimate",
    ),
    "jetson_nano": DeviceProfile(
        # estimate: 2x a Pi 4, i.e. ~20 % of the Nano's 236 GFLOP/s fp32 peak being reached
        # by small-batch CIFAR training would be ~2.4x; we take the more conservative 2x.
        flops_per_s=_from_resnet32(47.4),
        memory_bytes=4 * GiB,  # shared CPU/GPU memory
        step_overhead_s=0.001,  # estimate
        op_overhead_s=40e-6,  # estimate: eager dispatch on a Cortex-A57 plus a CUDA launch
        io_bytes_per_s=45e6,  # microSD
        source="estimate: 2x rpi4 (NVIDIA datasheet: 236 GFLOP/s fp32 peak)",
    ),
    "pc": DeviceProfile(
        # ANCHORS: ResNet-32 trains at ~165 img/s with 2 threads on the development machine.
        flops_per_s=_from_resnet32(165.0),
        memory_bytes=16 * GiB,
        step_overhead_s=0.0002,
        op_overhead_s=12e-6,  # measured here: 15 us/op cnn1d, 22 us/op ResNet-32 at batch 2
        io_bytes_per_s=2e9,  # NVMe SSD
        source="measured here: 165 img/s ResNet-32, 2 CPU threads",
    ),
    "cloud_gpu": DeviceProfile(
        # ANCHORS: ResNet-32 on one H100 at batch 128 trains at 9.7 k img/s (torch 2.11).
        flops_per_s=_from_resnet32(9700.0),
        memory_bytes=80 * GiB,
        step_overhead_s=0.0002,
        op_overhead_s=8e-6,  # estimate: CUDA kernel launch latency from Python
        io_bytes_per_s=3e9,
        source="measured: 9.7 k img/s ResNet-32 at batch 128 on an H100",
    ),
}

Mbit = 1e6

LINK_PROFILES: dict[str, LinkProfile] = {
    "lan": LinkProfile(
        up_bps=940 * Mbit,  # gigabit Ethernet: TCP goodput ~940 Mbit/s
        down_bps=940 * Mbit,
        latency_s=0.00025,  # one switch hop
        jitter_s=0.00005,
        loss=0.0,
        source="gigabit Ethernet, one switch",
    ),
    "wifi": LinkProfile(
        up_bps=60 * Mbit,  # 802.11ac, typical home throughput, uplink about half
        down_bps=120 * Mbit,
        latency_s=0.003,
        jitter_s=0.002,
        loss=0.001,
        source="802.11ac typical indoor throughput; estimate",
    ),
    "lte": LinkProfile(
        up_bps=10 * Mbit,  # typical measured LTE: ~30 down / ~10 up, RTT ~60 ms
        down_bps=30 * Mbit,
        latency_s=0.030,
        jitter_s=0.010,
        loss=0.005,
        source="typical measured LTE throughput and latency; estimate",
    ),
    "wan": LinkProfile(
        up_bps=50 * Mbit,  # intercontinental path, RTT ~150 ms
        down_bps=50 * Mbit,
        latency_s=0.075,
        jitter_s=0.005,
        loss=0.001,
        source="intercontinental Internet path (e.g. Europe-US west coast); estimate",
    ),
    "wan_lossy": LinkProfile(
        up_bps=20 * Mbit,
        down_bps=20 * Mbit,
        latency_s=0.100,
        jitter_s=0.020,
        loss=0.02,
        source="congested intercontinental path; estimate",
    ),
}
