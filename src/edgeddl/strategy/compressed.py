"""Data-parallel SGD with compressed gradients: each device compresses, the sum goes back.

Each device adds its error-feedback memory to its own gradient, compresses it, and the codec
encodes it: the encoded length is what crosses the link, and the aggregator uses the decoded
payload, so sender and receiver agree exactly. Every replica applies the sample-weighted
mean with the same optimizer, so replicas stay identical.
Details: docs/compression.md#compressed-data-parallel
"""

from __future__ import annotations

from collections.abc import Callable
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
from edgeddl.compress.codec import CodecError
from edgeddl.compress.registry import (
    build_codec,
    build_compressor,
    build_feedback,
    build_phased,
)
from edgeddl.config.compression import CompressionConfig, CompressorConfig
from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.base import Aggregate, Combine, StepCost, StepPayloads, Update
from edgeddl.strategy.data_parallel import DataParallel, LossFn, tensor_bytes
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.per_device import apply_batchnorm_mean, batch_stats, weighted_mean


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
        self.combine: Combine = "phases" if self.phased is not None else "payloads"
        """Payloads are decoded one by one (a multi-phase scheme sums its phases)."""
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

    def step_cost(self, idx: np.ndarray) -> StepCost:
        up = self.up_estimate[idx]
        # Before the first aggregate: the union of everyone's payloads, at most the model.
        down = self.last_down_bytes or min(float(up.sum()), float(self.state_bytes))
        return StepCost(up_bytes=up, down_bytes=np.full(len(idx), float(down)))

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
        """Device `d`'s payload on the wire (single-phase schemes): compress, then encode."""
        payload = self._compressor(d).compress(compensated, step)
        data = self.codecs[d].encode(payload)
        self.up_estimate[d] = len(data)
        if payload.num_sent:
            self.bytes_per_value[d] = len(data) / payload.num_sent
        return data

    def decode(self, d: int, data: bytes) -> Payload:
        """Device `d`'s payload as the receiver reads it (`CodecError` if malformed)."""
        return self.codecs[d].decode(data, self.numel, self.max_payload_bytes)

    def decompressed(self, d: int, data: bytes, step: int) -> torch.Tensor:
        """What device `d`'s payload `data` carries, as the aggregation reads it."""
        return self._compressor(d).decompress(self.decode(d, data), step).to(self.params[0].device)

    def aggregate_payloads(
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

    # --- the aggregator's side on a real fleet -------------------------------------------

    def decode_body(self, device: int, body: bytes) -> torch.Tensor | Payload:
        """Device `device`'s payload as the aggregator reads it (`CodecError` if malformed,
        or if there is no such device)."""
        if not 0 <= device < len(self.settings):
            raise CodecError(f"there is no device {device}")
        return self.decode(device, body)

    def aggregate(
        self, step: int, devices: list[int], weights: list[float], decoded: list[Any]
    ) -> Aggregate | None:
        """The weighted mean of the decoded payloads at the wire's precision (or the robust
        rule's); None when the screen left nothing usable."""
        sent, agg = self.aggregate_payloads(devices, weights, decoded, step)
        if agg is None:
            return None
        return Aggregate(values=agg, extras=torch.zeros(0), sent=sent)

    def reconstruct(self, update: Update, step: int) -> torch.Tensor:
        """What `update`'s payload carries, as the aggregator reads it."""
        return self.decompressed(update.device, update.payload or b"", step)

    def run_phases(
        self,
        update: Update | None,
        weight: float,
        step: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[PhasedResult, int]:
        """A multi-phase scheme's phases for one member (`update` None: it sends zeros),
        each summed over the members by `reduce`; and the bytes its payloads take."""
        assert self.phased is not None
        device = self.params[0].device
        x = update.compensated if update is not None else None
        x = x if x is not None else torch.zeros(self.numel, device=device)
        result = self.phased.run([x], torch.tensor([weight]).to(device), step, reduce=reduce)
        if update is None:
            return result, 0
        codec = self.codecs[update.device]
        return result, sum(len(codec.encode(p[0])) for p in result.payloads)

    def commit_phases(self, result: PhasedResult) -> None:
        """Keep what carries over to the next step (PowerSGD's warm start)."""
        assert self.phased is not None
        self.phased.commit(result)

    def on_commit(self, update: Update, sent: torch.Tensor | None) -> None:
        """The step committed: the device's memory keeps what its payload did not carry."""
        if sent is not None and update.own is not None and update.compensated is not None:
            self.remember(update.device, update.own, update.compensated, sent)

    def _device_side(self, ids: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """DGC: weight decay joins each gradient before its memory does."""
        self.add_weight_decay(grads)
        return grads

    def device_updates(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], ids: list[int], step: int
    ) -> list[Update]:
        """Each device's update: its gradient (as its behaviour makes it), plus what its
        memory holds back, compressed and encoded (a multi-phase scheme encodes in phases)."""
        updates = super().device_updates(x, y, counts, ids, step)
        self.encode_updates(updates, step)
        return updates

    def encode_updates(self, updates: list[Update], step: int) -> None:
        """Each update's values plus what its device's memory holds back (`compensated`),
        compressed and encoded (`payload`; a multi-phase scheme encodes in phases)."""
        ids = [u.device for u in updates]
        inputs = self.compensate(ids, [u.values for u in updates if u.values is not None], step)
        for u, c in zip(updates, inputs, strict=True):
            u.own, u.compensated = u.values, c
            if self.phased is None:
                u.payload = self.encode(u.device, c, step)

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        ids = devices.tolist()
        updates = self.device_updates(x, y, counts, ids, step)
        inputs = [u.compensated for u in updates if u.compensated is not None]
        ex = StepPayloads(
            devices=devices, counts=counts, step=step, up_bytes=np.zeros(0), updates=updates
        )
        if self.phased is not None:
            w = torch.tensor(counts, dtype=torch.float32) / sum(counts)
            ex.phased = self.phased.run(inputs, w.to(inputs[0].device), step)
            ex.up_bytes = np.array(
                [
                    [len(self.codecs[d].encode(p)) for d, p in zip(ids, phase, strict=True)]
                    for phase in ex.phased.payloads
                ]
            )
            ex.mid_down_bytes = tuple(
                len(self.down_codec.encode(r)) for r in ex.phased.reductions[:-1]
            )
            self.up_estimate[devices] = ex.up_bytes.sum(axis=0)
        else:
            ex.up_bytes = np.array([[len(u.payload or b"") for u in updates]])
        return ex

    def commit(self, ex: StepPayloads, contributed: np.ndarray) -> torch.Tensor | None:
        self._count(ex, contributed)
        for u, ok in zip(ex.updates, contributed.tolist(), strict=True):
            if not ok:  # a crash: the device's memory and compressor state are gone
                self.forget(u.device)
        kept = [ex.updates[i] for i in np.flatnonzero(contributed)]
        if not kept:
            return None
        total = sum(round(u.weight) for u in kept)
        weights = [round(u.weight) / total for u in kept]
        losses = torch.stack([u.loss for u in kept])
        w = torch.tensor(weights, dtype=torch.float32, device=losses.device)
        ids = [u.device for u in kept]
        inputs = [u.compensated for u in kept if u.compensated is not None]
        agg: torch.Tensor | None
        if self.phased is not None:
            result = ex.phased
            if result is None or len(kept) < len(ex.updates):  # the phases again, among survivors
                result = self.phased.run(inputs, w, ex.step)
            self.phased.commit(result)
            sent, agg = result.sent, result.aggregate
            self.last_down_bytes = len(self.down_codec.encode(result.reductions[-1]))
        else:  # the aggregator decodes what arrived
            received = [self.decode(u.device, u.payload or b"") for u in kept]
            sent, agg = self.aggregate_payloads(ids, weights, received, ex.step)
        for u, s in zip(kept, sent, strict=True):
            assert u.own is not None and u.compensated is not None
            self.remember(u.device, u.own, u.compensated, s)
        if agg is None:  # the screen left nothing usable: the model stays as it is
            return (losses * w).sum()
        apply_batchnorm_mean(
            self.model, weighted_mean(batch_stats(kept), w.tolist()), self.batchnorms
        )
        self.apply(agg)
        return (losses * w).sum()
