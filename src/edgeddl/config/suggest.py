"""Suggestions for an unknown scenario key: typos by similarity, and the names other tools use
for the same setting (learning_rate is `lr` here, batch_size is `global_batch`).

difflib alone misses those: `lerning_rate` is close to `learning_rate`, not to `lr`. So the
aliases below join the candidates, each standing for the key it names, and a misspelt alias
still finds its key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection

ALIASES: dict[str, tuple[str, ...]] = {
    # An alias names the keys it may mean, in order; the first one the table allows wins.
    "learning_rate": ("lr", "local_lr", "server_lr"),
    "lr_rate": ("lr", "local_lr"),
    "batch_size": ("global_batch", "local_batch"),
    "batch": ("global_batch", "local_batch"),
    "steps": ("num_steps", "local_steps"),
    "max_steps": ("num_steps",),
    "iterations": ("num_steps", "local_steps"),
    "epochs": ("num_steps", "local_epochs"),
    "rounds": ("num_steps",),
    "eval_interval": ("eval_every",),
    "eval_freq": ("eval_every",),
    "evaluate_every": ("eval_every",),
    "weight_decay_rate": ("weight_decay",),
    "wd": ("weight_decay",),
    "l2": ("weight_decay",),
    "mom": ("momentum",),
    "max_time_s": ("max_virtual_time_s",),
    "time_limit_s": ("max_virtual_time_s",),
    "classes": ("num_classes",),
    "samples": ("num_samples",),
    "shape": ("input_shape",),
    "data_dir": ("root",),
    "path": ("root",),
    "arch": ("name",),
    "architecture": ("name",),
    "method": ("compressor", "rule"),
    "ratio": ("density",),
    "topk_ratio": ("density",),
    "aggregator": ("rule",),
    "aggregation": ("rule",),
    "byzantine": ("num_byzantine",),
    "num_attackers": ("num_byzantine",),
    "workers": ("devices",),
    "clients": ("devices",),
    "nodes": ("devices",),
    "flops": ("flops_per_s",),
    "memory": ("memory_bytes",),
    "bandwidth_bps": ("up_bps",),
}


def _normalise(key: str) -> str:
    """Lower case, `-` and spaces as `_`, and n_/number_of_/nb_ as the house's num_."""
    key = re.sub(r"[-\s]+", "_", key.strip().lower())
    return re.sub(r"^(n|nb|number_of)_", "num_", key)


def suggest_key(key: str, allowed: Collection[str]) -> str | None:
    """The allowed key `key` most likely means, or None when nothing is close."""
    norm = _normalise(key)
    if norm in allowed:
        return norm
    candidates = {name: name for name in allowed}
    for alias, meanings in ALIASES.items():
        meant = next((m for m in meanings if m in allowed), None)
        if meant is not None and alias not in candidates:
            candidates[alias] = meant
    close = difflib.get_close_matches(norm, list(candidates), n=1)
    return candidates[close[0]] if close else None
