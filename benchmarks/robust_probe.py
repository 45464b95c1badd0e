"""How far a robust rule's output is from the honest devices' mean, step by step.

A diagnostic for `robust_aggregation.py`'s fleet (nine Pi 4s, MNIST-1D, the 1-D CNN): one
run of a variant under an attack, with the coordinator's `RobustAggregator.combine` wrapped
so that every step it also computes the mean of the honest devices' updates (the attackers
are the last f devices) and prints, per 100 steps: the cosine between the rule's output
and that mean, the ratio of their norms, and how far the rows the rule saw (after nnm or
bucketing) are from it (the norm of the honest rows' differences over the mean's norm).
With perfect nearest-neighbour mixing every honest row is the honest mean (0.0 there) and
the median returns it (cosine 1.0).

    python benchmarks/robust_probe.py --variant median+nnm --attack sign_flip --f 2 \\
        --samples 20000 --steps 1200      # ~30 s
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import robust_aggregation as bench  # type: ignore[import-not-found]
from common import load_data  # type: ignore[import-not-found]
from edgeddl.aggregation.robust import RobustAggregator
from edgeddl.config.loader import scenario_from_dict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="median+nnm")
    p.add_argument("--attack", default="sign_flip", choices=sorted(bench.BEHAVIORS))
    p.add_argument("--f", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--samples", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    honest = bench.NUM_DEVICES - args.f
    raw = bench.scenario_raw("mean", "", 0, args.steps, args.seed, args.samples)
    data = load_data(scenario_from_dict(raw))
    rows: list[tuple[int, float, float, float]] = []
    combine = RobustAggregator.combine

    def probed(self, step, devices, updates, weights):  # type: ignore[no-untyped-def]
        agg, keep = combine(self, step, devices, updates, weights)
        good = [u for d, u in zip(devices, updates, strict=True) if d < honest]
        if agg is not None and good:
            mean = torch.stack(good).double().mean(dim=0)
            seen = self.pre_aggregate(torch.stack(updates)[keep], step).double()
            honest_rows = seen[[i for i, k in enumerate(keep) if devices[k] < honest]]
            cos = torch.nn.functional.cosine_similarity(agg.double(), mean, dim=0)
            rows.append(
                (
                    step,
                    float(cos),
                    float(agg.double().norm() / mean.norm()),
                    float((honest_rows - mean).norm() / mean.norm()),
                )
            )
        return agg, keep

    RobustAggregator.combine = probed  # type: ignore[method-assign]
    try:
        result = bench.one_run(
            args.variant, args.attack, args.f, args.steps, args.seed, data, args.samples
        )
    finally:
        RobustAggregator.combine = combine  # type: ignore[method-assign]
    print(f"{args.variant} under {args.attack} f={args.f}: {result['final_accuracy']:.3f}")
    table = np.array(rows)
    print("steps      cosine  min cosine  norm ratio  honest rows off")
    for lo in range(0, args.steps, 100):
        block = table[(table[:, 0] >= lo) & (table[:, 0] < lo + 100)]
        if len(block):
            cos, ratio, off = block[:, 1:].mean(axis=0)
            print(
                f"{lo:4d}-{lo + 99:<4d}  {cos:6.3f}  {block[:, 1].min():10.3f}  "
                f"{ratio:10.3f}  {off:15.3f}"
            )


if __name__ == "__main__":
    main()
