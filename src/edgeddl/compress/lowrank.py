"""PowerSGD: rank-r gradient compression in two all-reduce phases (Vogels et al., NeurIPS 2019).

Each weight matrix is approximated by two thin factors, P and Q, with one warm-started step
of power iteration. The factors are linear in the gradient, so the mean of the devices'
factors is the factor of the mean gradient: the scheme rides a plain all-reduce (phase 0
sums P, phase 1 sums Q). Vectors and matrices too small to gain go dense in phase 0.
Details (the phases, payload formats, batching): docs/compression.md#powersgd
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeddl.compress.base import Layout, Payload, PhasedResult, Reduce
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import BuildContext


@dataclass(frozen=True, slots=True)
class _Group:
    """Compressed matrices of one shape and rank, and where they start in the grouped order."""

    rows: int
    cols: int
    rank: int
    count: int
    m_start: int
    """Offset of the group's matrices in the grouped gradient."""
    p_start: int
    """Offset of the group's P factors in the grouped phase-0 values."""
    q_start: int
    """Offset of the group's Q factors in the grouped phase-1 values."""

    def m(self, grouped: torch.Tensor) -> torch.Tensor:
        """(..., count, rows, cols) view of the group's matrices in grouped gradients."""
        size = self.count * self.rows * self.cols
        return grouped[..., self.m_start : self.m_start + size].unflatten(
            -1, (self.count, self.rows, self.cols)
        )

    def p(self, grouped: torch.Tensor) -> torch.Tensor:
        size = self.count * self.rows * self.rank
        return grouped[..., self.p_start : self.p_start + size].unflatten(
            -1, (self.count, self.rows, self.rank)
        )

    def q(self, grouped: torch.Tensor) -> torch.Tensor:
        size = self.count * self.cols * self.rank
        return grouped[..., self.q_start : self.q_start + size].unflatten(
            -1, (self.count, self.cols, self.rank)
        )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def _ranges(spans: list[tuple[int, int]]) -> torch.Tensor:
    """The concatenated integer ranges [start, start + size) of `spans`."""
    if not spans:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(start, start + size) for start, size in spans])


class PowerSGD:
    """Rank-`rank` PowerSGD over a flat gradient laid out as `layout`, warm start seeded by `seed`.

    `run` is pure; `commit` takes the step's mean Q as the next warm start. The caller does
    error feedback: `xs` are already compensated and `PhasedResult.sent` is what each device
    accounted for.
    """

    name = "powersgd"
    fixed_size = True
    allreduce = True
    num_phases = 2

    def __init__(self, layout: Layout, rank: int, seed: int) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.layout = layout
        self.rank = rank
        self.seed = seed

        offsets = [0]
        for size in layout.sizes():
            offsets.append(offsets[-1] + size)

        # Decide which tensors are compressed and where their factors sit in the payloads
        # (layout order), then group the compressed ones by shape.
        members: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        dense: list[tuple[int, int]] = []  # (offset, size) in the flat gradient
        p_len = q_len = 0
        q_draws: list[int] = []  # Q sizes in layout order, for the initial draw
        for k, shape in enumerate(layout.shapes):
            mat = _matrix_shape(shape)
            if mat is not None:
                rows, cols = mat
                r = min(rank, rows, cols)
                if r * (rows + cols) < rows * cols:
                    members.setdefault((rows, cols, r), []).append((k, p_len, q_len))
                    q_draws.append(cols * r)
                    p_len += rows * r
                    q_len += cols * r
                    continue
            dense.append((offsets[k], offsets[k + 1] - offsets[k]))

        self._p_len = p_len
        self._q_len = q_len
        self._dense_len = sum(size for _, size in dense)

        # Grouped order: each group's matrices back to back, then the dense tensors. The
        # spans record, for every grouped position, its position in layout order.
        groups: list[_Group] = []
        m_spans: list[tuple[int, int]] = []
        p_spans: list[tuple[int, int]] = []
        q_spans: list[tuple[int, int]] = []
        m_at = p_at = q_at = 0
        for (rows, cols, r), ms in members.items():
            groups.append(_Group(rows, cols, r, len(ms), m_at, p_at, q_at))
            m_spans += [(offsets[k], rows * cols) for k, _, _ in ms]
            p_spans += [(p0, rows * r) for _, p0, _ in ms]
            q_spans += [(q0, cols * r) for _, _, q0 in ms]
            m_at += len(ms) * rows * cols
            p_at += len(ms) * rows * r
            q_at += len(ms) * cols * r
        self._groups = groups
        self._dense_start = m_at

        # x_grouped = x[_to_grouped]; x = x_grouped[_from_grouped]; likewise for the payloads.
        self._to_grouped = _ranges(m_spans + dense)
        self._from_grouped = torch.argsort(self._to_grouped)
        self._p_to_grouped = _ranges([*p_spans, (p_len, self._dense_len)])
        self._p_from_grouped = torch.argsort(self._p_to_grouped)
        self._q_to_grouped = _ranges(q_spans)
        self._q_from_grouped = torch.argsort(self._q_to_grouped)

        # Every device draws the same initial Q from the shared seed, matrix by matrix in layout
        # order, so the draw does not depend on how matrices are grouped.
        gen = torch.Generator().manual_seed(seed)
        q0 = [torch.randn(size, generator=gen) for size in q_draws]
        # The warm start: every matrix's Q, in grouped order.
        self._q = torch.cat(q0)[self._q_to_grouped] if q0 else torch.zeros(0)

    @property
    def floats_per_device(self) -> int:
        """Floats one device sends per step, both phases together."""
        return self._p_len + self._dense_len + self._q_len

    def example_payloads(self) -> list[Payload]:
        n0 = self._p_len + self._dense_len
        return [
            Payload(numel=n0, values=torch.zeros(n0)),
            Payload(numel=self._q_len, values=torch.zeros(self._q_len)),
        ]

    def run(
        self,
        xs: list[torch.Tensor],
        weights: torch.Tensor,
        step: int,
        reduce: Reduce | None = None,
    ) -> PhasedResult:
        # `step` is unused: everything the devices share is in the warm start.
        del step
        reduce = reduce or _identity
        if not xs:
            raise ValueError("run needs at least one device")
        if weights.shape != (len(xs),):
            raise ValueError(f"weights has shape {tuple(weights.shape)}, want ({len(xs)},)")
        n = self.layout.numel
        for x in xs:
            if x.shape != (n,):
                raise ValueError(f"input has shape {tuple(x.shape)}, want ({n},)")

        xg = torch.stack(xs).index_select(1, self._to_grouped.to(xs[0].device))
        devices = xg.shape[0]
        w = weights.to(xg)
        q_warm = self._q.to(xg)
        dense = xg[:, self._dense_start :]
        # Contiguous copies: matmul would otherwise copy each strided view once per phase.
        mats = [g.m(xg).contiguous() for g in self._groups]  # (devices, count, rows, cols)

        # Phase 0: P_i = M_i Q, one batched matmul per group for every device.
        ps = [torch.matmul(m, g.q(q_warm)) for g, m in zip(self._groups, mats, strict=True)]
        v0 = torch.cat([*(p.flatten(1) for p in ps), dense], dim=1)
        v0 = v0.index_select(1, self._p_from_grouped.to(xg.device))
        mean0 = reduce(w @ v0)
        mean0g = mean0[self._p_to_grouped.to(xg.device)]

        # Orthonormal columns by Householder QR: unlike Gram-Schmidt it stays well defined
        # when the mean P is rank deficient (say a zero gradient).
        p_hats = [torch.linalg.qr(g.p(mean0g), mode="reduced").Q for g in self._groups]

        # Phase 1: Q_i = M_i^T P_hat.
        qs = [torch.matmul(m.transpose(-1, -2), ph) for m, ph in zip(mats, p_hats, strict=True)]
        v1 = torch.cat([q.flatten(1) for q in qs], dim=1) if qs else xg.new_zeros(devices, 0)
        v1 = v1.index_select(1, self._q_from_grouped.to(xg.device))
        mean1 = reduce(w @ v1)
        mean1g = mean1[self._q_to_grouped.to(xg.device)]

        # Reconstructions; dense tensors are sent exactly (their residual is zero), and the
        # aggregate's dense part is their weighted mean, the tail of the phase-0 reduction.
        from_grouped = self._from_grouped.to(xg.device)
        sent_mats = [
            torch.matmul(ph, q.transpose(-1, -2)).flatten(1)
            for ph, q in zip(p_hats, qs, strict=True)
        ]
        sent = torch.cat([*sent_mats, dense], dim=1).index_select(1, from_grouped)
        mean_mats = [
            torch.matmul(ph, g.q(mean1g).transpose(-1, -2)).flatten()
            for g, ph in zip(self._groups, p_hats, strict=True)
        ]
        aggregate = torch.cat([*mean_mats, mean0[self._p_len :]])[from_grouped]

        return PhasedResult(
            payloads=[
                [Payload(numel=int(v.numel()), values=v) for v in v0],
                [Payload(numel=int(v.numel()), values=v) for v in v1],
            ],
            reductions=[
                Payload(numel=int(mean0.numel()), values=mean0),
                Payload(numel=int(mean1.numel()), values=mean1),
            ],
            sent=list(sent.unbind(0)),
            aggregate=aggregate,
        )

    def commit(self, result: PhasedResult) -> None:
        """Take the step's mean Q (the phase-1 reduction) as the next warm start."""
        q_mean = result.reductions[1].values
        if q_mean is None or q_mean.shape != (self._q_len,):
            raise ValueError(f"the phase-1 reduction must hold {self._q_len} values")
        # Indexing copies, so the warm start never aliases the caller's result.
        self._q = q_mean.detach().to(device="cpu", dtype=torch.float32)[self._q_to_grouped]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The warm start, which every replica must share (a healing replica copies it)."""
        return {"q": self._q.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        q = state["q"]
        if q.shape != self._q.shape:
            raise ValueError(f"warm start has shape {tuple(q.shape)}, want {tuple(self._q.shape)}")
        self._q = q.detach().to(device="cpu", dtype=torch.float32).clone()


# How `config/compressors.py` builds these from a scenario's settings.


def build_powersgd(c: CompressorConfig, at: BuildContext) -> PowerSGD:
    return PowerSGD(at.layout, c.rank, at.seed)
