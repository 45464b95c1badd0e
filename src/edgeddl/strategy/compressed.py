"""Data-parallel SGD with compressed gradients: each device compresses, the sum goes back.

Per step, every device computes its own gradient (`per_device.py`), adds what its memory
holds back (`ErrorFeedback.compensate`), compresses it, and the wire codec encodes the
payload: its `len()` is what crosses the link. What the aggregator uses is the *decoded*
payload (fp16 rounding on the wire included), so sender and receiver agree exactly.

The aggregator (parameter server, or every replica after an all-reduce) takes the
sample-weighted mean of the arrived payloads and every replica applies it with the same
optimizer, so replicas stay identical. In the star, the coordinator sends that aggregate back
at the next step's start, encoded dense or sparse, whichever is smaller (the union of sparse
payloads is sparse); a device that missed a step fetches the whole model instead.

A device whose work is lost (it crashed) loses its memory too: it restarts from nothing.
Multi-round schemes (PowerSGD) are computed among the arrived devices; a crash means the
rounds are computed again without it, as a real all-reduce would be re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.compress.base import (
    Compressor,
    ErrorFeedback,
    Payload,
    PhasedCompressor,
    PhasedResult,
)
from edgeddl.compress.registry import (
    build_codec,
    build_compressor,
    build_feedback,
    build_phased,
)
from edgeddl.config.compression import CompressionConfig, CompressorConfig
from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.data_parallel import DataParallel, Exchange, LossFn, tensor_bytes
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.per_device import DeviceGradients, apply_batchnorm_stats


@dataclass(slots=True)
class _Work:
    grads: DeviceGradients
    received: list[Payload]
    """Single-round: each device's payload as decoded at the aggregator."""
    phased: PhasedResult | None
    datas: list[bytes] = field(default_factory=list)
    """Single-round: each device's encoded payload, as sent."""


def _dense(p: Payload) -> torch.Tensor:
    """The flat tensor a dense-or-sparse payload of the aggregate stands for."""
    assert p.values is not None
    if p.indices is None:
        return p.values
    out = torch.zeros(p.numel, dtype=p.values.dtype, device=p.values.device)
    return out.index_copy_(0, p.indices.to(p.values.device), p.values)


class CompressedDataParallel(DataParallel):
    """`DataParallel` whose devices send compressed gradients (`[compression]`)."""

    name = "data_parallel"

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        comp: CompressionConfig,
        device_settings: list[CompressorConfig],
        seed: int,
        loss_fn: LossFn = nn.functional.cross_entropy,
    ) -> None:
        # DGC's memory carries the momentum (momentum correction), and weight decay joins the
        # gradient before it, as in the DGC reference: the optimizer does neither.
        dgc = COMPRESSORS[comp.compressor].owns_momentum
        super().__init__(
            model, cfg, loss_fn, momentum=0.0 if dgc else None, weight_decay=0.0 if dgc else None
        )
        self.local_weight_decay = cfg.weight_decay if dgc else 0.0
        self.cfg = comp
        self.seed = seed
        self.train_momentum = cfg.momentum
        self.settings = device_settings
        self.codecs = [build_codec(s) for s in device_settings]
        self.down_codec = build_codec(comp)
        self.phased: PhasedCompressor | None = None
        if COMPRESSORS[comp.compressor].num_phases > 1:
            self.phased = build_phased(comp, self.layout, seed)
        self.compressors: dict[int, Compressor] = {}
        self.memories: dict[int, ErrorFeedback] = {}
        self.last_down_bytes = 0
        """The last aggregate on the wire (what the star sends down at the next step)."""
        self.bytes_per_value = np.full(len(device_settings), np.nan)
        """Each device's last payload: encoded bytes per value sent (for adaptation)."""
        self.up_estimate = np.array([self._example_bytes(s) for s in device_settings], float)
        """Each device's payload size, for balancing: a typical one, then the last sent."""
        self.fetch_bytes = self.state_bytes + (
            tensor_bytes(self.params) if cfg.momentum and not dgc else 0
        )
        """What a device that missed a step fetches: the model and, as its replica runs the
        optimizer, the momentum buffer."""

    def _example_bytes(self, setting: CompressorConfig) -> float:
        """Encoded size of a typical payload (a random gradient through a fresh compressor)."""
        if self.phased is not None:
            return float(
                sum(len(self.down_codec.encode(p)) for p in self.phased.example_payloads())
            )
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.numel, generator=g) * 1e-3
        comp = build_compressor(setting, self.layout, self.seed, 0)
        return float(len(build_codec(setting).encode(comp.compress(x, 0))))

    def _compressor(self, d: int) -> Compressor:
        if d not in self.compressors:
            self.compressors[d] = build_compressor(self.settings[d], self.layout, self.seed, d)
        return self.compressors[d]

    def _memory(self, d: int) -> ErrorFeedback:
        if d not in self.memories:
            n = len(self.settings)
            self.memories[d] = build_feedback(self.settings[d], self.train_momentum, n)
        return self.memories[d]

    def set_density(self, devices: np.ndarray, density: np.ndarray) -> None:
        """Network-aware policy: each listed device's density for the coming step."""
        for d, v in zip(devices.tolist(), density.tolist(), strict=True):
            self._compressor(d).density = v  # type: ignore[attr-defined]

    def payload_bytes(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        up = self.up_estimate[idx]
        # Before the first aggregate: the union of everyone's payloads, at most the model.
        down = self.last_down_bytes or min(float(up.sum()), float(self.state_bytes))
        return up, np.full(len(idx), float(down))

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """The last aggregate, or the model and momentum for a device that missed a step."""
        return np.where(needs_model, self.fetch_bytes, self.last_down_bytes).astype(np.int64)

    def replica_state(self) -> dict[str, Any]:
        """Model, optimizer and, for PowerSGD, the warm start every replica shares."""
        state = super().replica_state()
        if self.phased is not None:
            state["phased"] = self.phased.state_dict()
        return state

    def load_replica_state(self, state: dict[str, Any]) -> None:
        super().load_replica_state(state)
        if self.phased is not None:
            self.phased.load_state_dict(state["phased"])

    def device_state(self, device: int) -> dict[str, Any]:
        """What only this device holds (its error-feedback memory), as tensors."""
        return {"memory": self._memory(device).state_dict()}

    def load_device_state(self, device: int, state: dict[str, Any]) -> None:
        self._memory(device).load_state_dict(state.get("memory", {}))

    def forget(self, device: int) -> None:
        """The device crashed: its memory and compressor state are gone."""
        self.memories.pop(device, None)
        self.compressors.pop(device, None)

    def add_weight_decay(self, grads: list[torch.Tensor]) -> None:
        """DGC: weight decay joins each gradient (in place) before its memory does."""
        if self.local_weight_decay:
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            for gi in grads:
                gi.add_(flat, alpha=self.local_weight_decay)

    def compensate(
        self, devices: list[int], grads: list[torch.Tensor], step: int
    ) -> list[torch.Tensor]:
        """What each device compresses: its gradient plus what its memory holds back (pure)."""
        inputs = [self._memory(d).compensate(gi) for d, gi in zip(devices, grads, strict=True)]
        finite = torch.stack([torch.isfinite(c).all() for c in inputs])
        if not bool(finite.all()):  # one host sync a step; a NaN cannot be encoded anyway
            raise TrainingDiverged(step, devices[int((~finite).nonzero()[0, 0])])
        return inputs

    def encode(self, d: int, compensated: torch.Tensor, step: int) -> bytes:
        """Device `d`'s payload on the wire (single-round schemes): compress, then encode."""
        payload = self._compressor(d).compress(compensated, step)
        data = self.codecs[d].encode(payload)
        self.up_estimate[d] = len(data)
        if payload.num_sent:
            self.bytes_per_value[d] = len(data) / payload.num_sent
        return data

    def decode(self, d: int, data: bytes) -> Payload:
        """Device `d`'s payload as the receiver reads it (`CodecError` if malformed)."""
        return self.codecs[d].decode(data, self.numel)

    def decompressed(self, d: int, data: bytes, step: int) -> torch.Tensor:
        """What device `d`'s payload `data` carries, as the aggregation reads it."""
        return self._compressor(d).decompress(self.decode(d, data), step).to(self.params[0].device)

    def aggregate(
        self, devices: list[int], weights: list[float], received: list[Payload], step: int
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(what each device sent, decompressed; the aggregate every replica applies).

        The aggregate is the weighted mean at the wire codec's precision: with fp16 values
        its rounding (relative 2**-11, to nearest) is applied, not fed back. With `[robust]`
        the decoded payloads go through the screen and the rule instead of the mean; None
        when none is usable (the step changes nothing).
        """
        device = self.params[0].device
        sent = [
            self._compressor(d).decompress(p, step).to(device)
            for d, p in zip(devices, received, strict=True)
        ]
        self.num_empty += sum(p.num_sent == 0 for p in received)
        if self.robust is not None:
            robust, _ = self.robust.combine(step, devices, sent, weights)
            if robust is None:
                return sent, None
            mean = robust.float()
        else:
            mean = torch.zeros(self.numel, dtype=torch.float32, device=device)
            for wi, si in zip(weights, sent, strict=True):
                mean.add_(si, alpha=wi)
        data = self.down_codec.encode(self.down_codec.dense_or_sparse(mean))
        self.last_down_bytes = len(data)
        return sent, _dense(self.down_codec.decode(data, self.numel)).to(device)

    def remember(
        self, d: int, grad: torch.Tensor, compensated: torch.Tensor, sent: torch.Tensor
    ) -> None:
        """The step committed: device `d`'s memory keeps what it did not send."""
        self._memory(d).commit(grad, compensated, sent)

    def payload_bodies(self, ex: Exchange) -> list[bytes]:
        """Each device's encoded payload (single-round compressors)."""
        work: _Work = ex.work
        if work.phased is not None:
            raise ValueError("a multi-round compressor's payloads are summed on the way")
        return work.datas

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        ids = devices.tolist()
        g = self.device_gradients(x, y, counts, ids)
        self.add_weight_decay(g.grads)
        if self.behaviors is not None:  # a device's memory and compressor see what it sends
            g.grads = self.behaviors.tamper(g.grads, ids, step)
        inputs = self.compensate(ids, g.grads, step)
        mid: tuple[int, ...] = ()
        if self.phased is not None:
            w = torch.tensor(counts, dtype=torch.float32) / sum(counts)
            result = self.phased.run(inputs, w.to(inputs[0].device), step)
            up = np.array(
                [
                    [len(self.codecs[d].encode(p)) for d, p in zip(ids, phase, strict=True)]
                    for phase in result.payloads
                ]
            )
            mid = tuple(len(self.down_codec.encode(r)) for r in result.reductions[:-1])
            self.up_estimate[devices] = up.sum(axis=0)
            work = _Work(grads=g, received=[], phased=result)
        else:
            datas = [self.encode(d, c, step) for d, c in zip(ids, inputs, strict=True)]
            up = np.array([[len(b) for b in datas]])
            received = [self.decode(d, b) for d, b in zip(ids, datas, strict=True)]
            work = _Work(grads=g, received=received, phased=None, datas=datas)
        return Exchange(
            devices=devices, counts=counts, step=step, up_bytes=up, mid_down_bytes=mid, work=work
        )

    def commit(self, ex: Exchange, contributed: np.ndarray) -> torch.Tensor | None:
        work: _Work = ex.work
        self._count(ex, contributed)
        ids = ex.devices.tolist()
        for d, ok in zip(ids, contributed.tolist(), strict=True):
            if not ok:  # a crash: the device's memory and compressor state are gone
                self.forget(d)
        keep = np.flatnonzero(contributed).tolist()
        if not keep:
            return None
        grads = work.grads.grads
        weights = [ex.counts[i] / sum(ex.counts[j] for j in keep) for i in keep]
        w = torch.tensor(weights, dtype=torch.float32, device=grads[0].device)
        kept = [ids[i] for i in keep]
        inputs = [self._memory(d).compensate(grads[i]) for d, i in zip(kept, keep, strict=True)]
        agg: torch.Tensor | None
        if self.phased is not None:
            result = work.phased
            if result is None or len(keep) < len(ids):  # the rounds again, among survivors
                result = self.phased.run(inputs, w, ex.step)
            self.phased.commit(result)
            sent, agg = result.sent, result.aggregate
            self.last_down_bytes = len(self.down_codec.encode(result.reductions[-1]))
        else:
            sent, agg = self.aggregate(kept, weights, [work.received[i] for i in keep], ex.step)
        for d, i, c, s in zip(kept, keep, inputs, sent, strict=True):
            self.remember(d, grads[i], c, s)
        if agg is None:  # the screen left nothing usable: the model stays as it is
            return (work.grads.losses[keep] * w).sum()
        apply_batchnorm_stats(self.model, work.grads.bn_stats, keep, w, self.batchnorms)
        self.apply(agg)
        return (work.grads.losses[keep] * w).sum()
