"""`edgeddl calibrate`: measure this machine as a device profile, the way the built-ins are.

Times ResNet-32 training steps on CIFAR-shaped random tensors at two batch sizes. Step time
is linear in the batch, ``t(b) = fixed + b * per_sample``, so two sizes give both: the
effective FLOP/s is the model's measured training FLOPs per sample over ``per_sample``, and
the per-operator overhead is ``fixed`` over the operators one step dispatches.
"""

from __future__ import annotations

import os
import platform
import time

import tomli_w
import torch

from edgeddl.config.schema import DeviceProfile

SMALL_BATCH, LARGE_BATCH = 2, 64


def _median_step_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:  # the first steps allocate and warm caches
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def calibrate_profile(threads: int = 0) -> tuple[DeviceProfile, str]:
    from edgeddl.models import build_model, model_cost

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = build_model("resnet32", input_shape=shape, num_classes=10)
    cost = model_cost(model, shape)
    t_small = _median_step_s(
        model, torch.randn(SMALL_BATCH, *shape), torch.randint(0, 10, (SMALL_BATCH,)), repeats=9
    )
    t_large = _median_step_s(
        model, torch.randn(LARGE_BATCH, *shape), torch.randint(0, 10, (LARGE_BATCH,)), repeats=5
    )
    per_sample = max((t_large - t_small) / (LARGE_BATCH - SMALL_BATCH), 1e-9)
    fixed = max(t_small - SMALL_BATCH * per_sample, 0.0)
    memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    profile = DeviceProfile(
        flops_per_s=cost.train_flops_per_sample / per_sample,
        memory_bytes=memory,
        op_overhead_s=fixed / cost.ops_per_step,
        source=f"edgeddl calibrate on {platform.node()} ({platform.machine()}, "
        f"{torch.get_num_threads()} threads): ResNet-32 {1 / per_sample:.1f} img/s",
    )
    report = (
        f"ResNet-32: {1 / per_sample:.1f} img/s at batch {LARGE_BATCH} "
        f"({profile.flops_per_s / 1e9:.1f} GFLOP/s effective), fixed {fixed * 1e3:.2f} ms "
        f"per step ({profile.op_overhead_s * 1e6:.1f} us/op over {cost.ops_per_step} ops), "
        f"memory {memory / 2**30:.1f} GiB"
    )
    return profile, report


def profile_toml(name: str, profile: DeviceProfile) -> str:
    fields = {k: getattr(profile, k) for k in DeviceProfile.__dataclass_fields__}
    return tomli_w.dumps({"profiles": {name: fields}})
