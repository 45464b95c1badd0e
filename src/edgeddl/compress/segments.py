"""Where each layer of a `Layout` lies in a flat gradient, and per-layer reductions.

The compressors that work per layer (quantizers' scales, two-step's layer-normalised
significance) share these, so a model's hundred layers cost a handful of kernels, never a
Python loop over the layers.
"""

from __future__ import annotations

import torch

from edgeddl.compress.base import Layout, Payload


def check_flat(x: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """`x` as a flat float32 tensor, or an error if it is not one of the expected length."""
    if x.dim() != 1 or (numel is not None and x.numel() != numel):
        expected = "a flat tensor" if numel is None else f"a flat tensor of {numel} elements"
        raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")
    return x.to(torch.float32)


class Segments:
    """Where each layer of a layout lies in the flat tensor, with per-layer reductions.

    The index tensors are built once per device and kept, so the hot path only launches a
    handful of kernels whatever the number of layers.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.sizes = layout.sizes()
        self.numel = layout.numel
        self._ids: dict[torch.device, torch.Tensor] = {}
        self._counts: dict[torch.device, torch.Tensor] = {}

    def ids(self, device: torch.device) -> torch.Tensor:
        """The layer of each element (int64, ``numel`` of them)."""
        ids = self._ids.get(device)
        if ids is None:
            sizes = torch.tensor(self.sizes, dtype=torch.int64, device=device)
            layers = torch.arange(len(self.sizes), device=device)
            ids = torch.repeat_interleave(layers, sizes, output_size=self.numel)
            self._ids[device] = ids
        return ids

    def counts(self, device: torch.device) -> torch.Tensor:
        """Elements per layer as float32, at least 1 so that an empty layer divides safely."""
        counts = self._counts.get(device)
        if counts is None:
            counts = torch.tensor(self.sizes, dtype=torch.float32, device=device).clamp_(min=1)
            self._counts[device] = counts
        return counts

    def check(self, x: torch.Tensor) -> torch.Tensor:
        return check_flat(x, self.numel)

    def check_payload(self, payload: Payload) -> None:
        if payload.numel != self.numel:
            raise ValueError(f"payload of {payload.numel} elements for a layout of {self.numel}")

    def norms(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """Each layer's L1 or L2 norm (float32, one per layer; 0 for an empty layer)."""
        if not self.sizes:
            return x.new_zeros(0)
        # The fused multi-tensor norm over views of the layers (private, but what
        # clip_grad_norm_ itself calls; torch is pinned): one pass, about five times faster
        # than a scatter-add over the layer ids on a CPU.
        return torch.stack(torch._foreach_norm(list(x.split(self.sizes)), order))

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's largest magnitude (float32, one per layer; 0 for an empty layer)."""
        # A scatter rather than the fused infinity norm, which rejects empty layers.
        out = x.new_zeros(len(self.sizes))
        return out.scatter_reduce_(0, self.ids(x.device), x.abs(), "amax", include_self=True)

    def expand(self, per_layer: torch.Tensor) -> torch.Tensor:
        """A per-layer tensor repeated over each layer's elements."""
        return per_layer.index_select(0, self.ids(per_layer.device))

    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / rms(layer)`` at every element of `x`; 0 in a layer that is all zeros."""
        if not self.sizes:
            return x.new_zeros(0)
        rms = self.norms(x, 2) / self.counts(x.device).sqrt()
        return self.expand(torch.where(rms > 0, rms.reciprocal(), torch.zeros_like(rms)))
