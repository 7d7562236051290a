"""DiLoCo and SparseLoCo: workers train alone for ``H`` steps, then exchange pseudo-gradients.

Every rank trains its own replica with its own inner optimizer (AdamW in the references) and
its own data; no DDP. Every ``sync_every`` inner steps, :meth:`OuterLoop.step` forms the
pseudo-gradient ``Δ_r = θ_start − θ_r`` and:

* **DiLoCo** (Douillard et al. 2023): all-reduces ``Δ`` (mean over ranks) and takes an outer
  Nesterov SGD step from ``θ_start`` (defaults as OpenDiLoCo: outer lr 0.7, momentum 0.9);
* **SparseLoCo** (Sarfi et al. 2025): accumulates ``e ← β·e + Δ_r`` (error feedback, β = 0.95),
  sends per chunk of ``chunk`` entries the top ``k`` of ``|e|`` (64 of 4096 = 1.56%, as Templar),
  quantised to 2 bits (4 bins over μ ± 6σ of the chosen values, decoded through the table of the
  bins' means, sent along), keeps ``e ← e − Δ̂``, and takes a plain SGD step of lr α = 1 from
  ``θ_start`` with the mean of every rank's ``Δ̂`` (no outer momentum: error feedback plays
  that part).

Differences from the references, on purpose: chunks are runs of ``chunk`` consecutive entries
of the flattened tensor (Templar cuts 2-D weights into 64×64 tiles); indices travel as int16
(Templar packs 12 bits); the mean is over all ranks (Templar averages each coordinate over the
peers that picked it).

With a :class:`~sparsetorch.masks.MaskSet` (identical on every rank), only live coordinates
are exchanged (DiLoCo packs them before the all-reduce; SparseLoCo chooses among them), and the
masks hold exactly after every outer step. ``bytes_sent`` counts what this rank transmits under
the ring algorithms (see :mod:`.hooks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import DistributedError
from ..masks import MaskSet
from .hooks import ring_bytes

__all__ = ["OuterLoop", "quantize_2bit", "dequantize_2bit", "chunk_topk", "chunk_counts"]

_BINS = 4


def quantize_2bit(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes uint8 in 0..3, table float32[4])``: 4 bins over ``mean ± 6·std`` of ``v`` (edges at
    −3σ, 0, +3σ around the mean); each value decodes to the mean of the values in its bin."""
    x = v.detach().float().reshape(-1)
    if not x.numel():
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(_BINS)
    mu, sd = x.mean(), x.std(unbiased=False)
    edges = mu + sd * torch.tensor([-3.0, 0.0, 3.0])
    codes = torch.bucketize(x, edges).to(torch.uint8)  # 0..3
    table = torch.zeros(_BINS)
    for b in range(_BINS):
        sel = codes == b
        if bool(sel.any()):
            table[b] = x[sel].mean()
    return codes, table


def dequantize_2bit(codes: Tensor, table: Tensor) -> Tensor:
    """The decoded values of :func:`quantize_2bit`."""
    return table[codes.long()]


def _pack2(codes: Tensor) -> Tensor:
    """Four 2-bit codes per byte (little end first)."""
    c = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 4)).view(-1, 4).to(torch.uint8)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def _unpack2(packed: Tensor, n: int) -> Tensor:
    p = packed.to(torch.uint8)
    return torch.stack([p & 3, (p >> 2) & 3, (p >> 4) & 3, (p >> 6) & 3], 1).reshape(-1)[:n]


def chunk_counts(numel: int, chunk: int, k: int, live: Tensor | None = None) -> Tensor:
    """Entries :func:`chunk_topk` picks in each run of ``chunk`` entries: ``k`` per full run,
    ``ceil(k · len / chunk)`` in a shorter last run, never more than the run's live entries.
    Deterministic from shapes and masks, so every rank knows every other rank's layout."""
    n_chunks = -(-numel // chunk)
    sizes = torch.full((n_chunks,), chunk, dtype=torch.long)
    if n_chunks and numel % chunk:
        sizes[-1] = numel % chunk
    want = torch.where(sizes == chunk, torch.full_like(sizes, min(k, chunk)),
                       torch.clamp(torch.ceil(k * sizes / chunk).long(), min=1))
    want = torch.minimum(want, sizes)
    if live is not None:
        flat = live.reshape(-1).to("cpu", torch.long)
        pad = torch.nn.functional.pad(flat, (0, n_chunks * chunk - numel))
        want = torch.minimum(want, pad.view(n_chunks, chunk).sum(1))
    return want


def chunk_topk(e: Tensor, chunk: int, k: int, live: Tensor | None = None,
               counts: Tensor | None = None) -> Tensor:
    """Flat indices, chunk by chunk in order, of the largest ``|e|`` in every run of ``chunk``
    entries (:func:`chunk_counts` of them; pass ``counts`` when already computed); with ``live``,
    only live entries are eligible."""
    x = e.detach().reshape(-1).abs().float().cpu()
    if live is not None:
        x = x.masked_fill(~live.reshape(-1).cpu(), -1.0)  # below every live |e|
    if counts is None:
        counts = chunk_counts(x.numel(), chunk, k, live)
    out = []
    for c, cnt in enumerate(counts.tolist()):
        if cnt:
            seg = x[c * chunk:(c + 1) * chunk]
            out.append(torch.topk(seg, cnt).indices.sort().values + c * chunk)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class OuterLoop:
    """DiLoCo / SparseLoCo around any inner optimizer: call :meth:`step` after every inner step.

    Args:
        model: this rank's replica (not DDP-wrapped). Its parameters are broadcast from rank 0
            at construction, so every replica starts equal.
        method: ``"diloco"`` or ``"sparseloco"``.
        sync_every: inner steps between outer steps (H, >= 1; OpenDiLoCo uses 500, Templar 30).
        outer_lr: DiLoCo 0.7, SparseLoCo 1.0 by default.
        outer_momentum: DiLoCo's Nesterov momentum (default 0.9; 0 = plain outer SGD).
        density: SparseLoCo's fraction sent per chunk (default 64/4096).
        chunk: SparseLoCo's chunk length (default 4096).
        ef_decay: SparseLoCo's β (default 0.95).
        quantize: SparseLoCo's 2-bit values (default True; False sends float32 values).
        masks: identical on every rank; only live coordinates travel.
        group: the process group (None: default).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "diloco",
        sync_every: int = 500,
        *,
        outer_lr: float | None = None,
        outer_momentum: float = 0.9,
        density: float = 64 / 4096,
        chunk: int = 4096,
        ef_decay: float = 0.95,
        quantize: bool = True,
        masks: MaskSet | None = None,
        group: Any = None,
    ) -> None:
        method = str(method).lower()
        if method not in ("diloco", "sparseloco"):
            raise DistributedError(f"outer method must be 'diloco' or 'sparseloco', got {method!r}.")
        if int(sync_every) < 1:
            raise DistributedError(f"sync_every (H) must be at least 1 inner step, got {sync_every}.")
        if not (0.0 < float(density) <= 1.0):
            raise DistributedError(f"density must be in (0, 1], got {density}.")
        if not (1 <= int(chunk) <= 32767):
            raise DistributedError(f"chunk must be 1..32767 entries (offsets travel as int16), got {chunk}.")
        if not (0.0 <= float(ef_decay) <= 1.0) or not (0.0 <= float(outer_momentum) < 1.0):
            raise DistributedError(f"need 0 <= ef_decay <= 1 and 0 <= outer_momentum < 1, got {ef_decay}, {outer_momentum}.")
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("OuterLoop needs an initialised process group (torch.distributed.init_process_group).")
        self.model, self.method, self.sync_every = model, method, int(sync_every)
        self.outer_lr = float(outer_lr if outer_lr is not None else (0.7 if method == "diloco" else 1.0))
        if not self.outer_lr > 0:
            raise DistributedError(f"outer_lr must be positive, got {outer_lr}.")
        self.density, self.chunk, self.ef_decay, self.quantize = float(density), int(chunk), float(ef_decay), bool(quantize)
        self.group, self.world = group, dist.get_world_size(group)
        self.masks = masks
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in self.params.values():
                dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self.start = {n: p.detach().clone() for n, p in self.params.items()}  # θ at the last sync
        self.outer_params = [nn.Parameter(t.clone()) for t in self.start.values()]
        self.outer_opt = torch.optim.SGD(self.outer_params, lr=self.outer_lr,
                                         momentum=float(outer_momentum) if method == "diloco" else 0.0,
                                         nesterov=bool(outer_momentum) and method == "diloco")
        self.errors = {n: torch.zeros_like(p) for n, p in self.params.items()} if method == "sparseloco" else {}
        self.inner_steps = 0
        self.outer_steps = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ the loop
    def step(self) -> bool:
        """Count one inner step; every ``sync_every`` steps run the outer step (collective).
        Returns True when an outer step ran."""
        self.inner_steps += 1
        if self.inner_steps % self.sync_every:
            return False
        with torch.no_grad():
            deltas = {n: self.start[n] - p.detach() for n, p in self.params.items()}
            if self.masks is not None:
                for n, m in self.masks.items():
                    if n in deltas:
                        deltas[n].masked_fill_(~m.to(deltas[n].device), 0)
            avg = self._diloco_mean(deltas) if self.method == "diloco" else self._sparseloco_mean(deltas)
            for op, n in zip(self.outer_params, self.params):
                op.grad = avg[n].to(op.dtype)
            self.outer_opt.step()
            self.outer_opt.zero_grad(set_to_none=True)
            for op, (n, p) in zip(self.outer_params, self.params.items()):
                if self.masks is not None and n in self.masks:
                    op.data.masked_fill_(~self.masks[n].to(op.device), 0)
                p.copy_(op.data)
                self.start[n].copy_(op.data)
        self.outer_steps += 1
        return True

    @torch.no_grad()
    def resync(self) -> None:
        """Restart the pseudo-gradient from the current parameters after the masks changed
        (call on every rank right after an outer step's mask update): ``θ_start`` and the outer
        parameters become the current weights, and the outer momentum of pruned positions is
        cleared (and SparseLoCo's error feedback there), so a weight grown later does not inherit
        what the dropped one left."""
        for op, (n, p) in zip(self.outer_params, self.params.items()):
            self.start[n].copy_(p)
            op.data.copy_(p)
            live = self._live(n)
            buf = self.outer_opt.state.get(op, {}).get("momentum_buffer")
            if live is not None and buf is not None:
                buf.masked_fill_(~live.to(buf.device), 0)
            if live is not None and n in self.errors:  # SparseLoCo: no stale residual on pruned positions
                self.errors[n].masked_fill_(~live.to(self.errors[n].device), 0)

    def _live(self, n: str) -> Tensor | None:
        return self.masks[n] if self.masks is not None and n in self.masks else None

    def _diloco_mean(self, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Mean of Δ over ranks by one all-reduce of the live coordinates (SUM, then ÷W)."""
        parts = []
        for n, d in deltas.items():
            live = self._live(n)
            parts.append(d.reshape(-1) if live is None else d[live.to(d.device)].reshape(-1))
        flat = torch.cat([x.to(parts[0].dtype) for x in parts]) if parts else torch.zeros(0)
        self.bytes_sent += ring_bytes("all_reduce", flat.numel() * flat.element_size(), self.world)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world)
        out, off = {}, 0
        for (n, d), part in zip(deltas.items(), parts):
            live = self._live(n)
            x = flat[off:off + part.numel()]
            off += part.numel()
            if live is None:
                out[n] = x.view_as(d).to(d.dtype)
            else:
                full = torch.zeros_like(d)
                full[live.to(d.device)] = x.to(d.dtype)
                out[n] = full
        return out

    def _sparseloco_mean(self, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Error feedback, chunked top-k, 2-bit values; all-gather; mean of every rank's Δ̂.

        Per tensor the message is: int16 offsets within their chunk (the chunk of each follows
        from :func:`chunk_counts`, the same on every rank), then the 4-entry float32 table and
        the 2-bit codes (or float32 values without quantisation).
        """
        k = max(1, math.ceil(self.density * self.chunk - 1e-9))
        parts, layout = [], []
        for n, d in deltas.items():
            e = self.errors[n]
            e.mul_(self.ef_decay).add_(d.to(e.dtype))
            counts = chunk_counts(d.numel(), self.chunk, k, self._live(n))
            idx = chunk_topk(e, self.chunk, k, self._live(n), counts)
            vals = e.reshape(-1)[idx.to(e.device)]
            if self.quantize:
                codes, table = quantize_2bit(vals)
                sent = dequantize_2bit(codes, table)
                body = [table.view(torch.uint8), _pack2(codes)]
            else:
                sent = vals.float()
                body = [sent.contiguous().view(torch.uint8)]
            e.view(-1)[idx.to(e.device)] -= sent.to(e.dtype).to(e.device)  # unsent (and rounding) stays
            parts += [(idx % self.chunk).to(torch.int16).view(torch.uint8), *body]
            layout.append((n, d.numel(), counts))
        payload = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
        self.bytes_sent += ring_bytes("all_gather", payload.numel(), self.world)
        gathered = [torch.empty_like(payload) for _ in range(self.world)]
        dist.all_gather(gathered, payload, group=self.group)
        out = {n: torch.zeros(d.numel(), dtype=torch.float64) for n, d in deltas.items()}
        for row in gathered:
            off = 0
            for n, _numel, counts in layout:
                cnt = int(counts.sum())
                local = row[off:off + 2 * cnt].clone().view(torch.int16).long()
                off += 2 * cnt
                idx = torch.repeat_interleave(torch.arange(counts.numel()), counts) * self.chunk + local
                if self.quantize:
                    table = row[off:off + 16].clone().view(torch.float32)
                    off += 16
                    nb = (cnt + 3) // 4
                    vals = dequantize_2bit(_unpack2(row[off:off + nb], cnt), table)
                    off += nb
                else:
                    vals = row[off:off + 4 * cnt].clone().view(torch.float32)
                    off += 4 * cnt
                out[n].index_add_(0, idx, vals.double())
        return {n: (out[n] / self.world).view_as(d).to(d.dtype).to(d.device) for n, d in deltas.items()}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Counters, θ at the last sync, the outer optimizer and the error-feedback buffers."""
        return {"method": self.method, "inner_steps": self.inner_steps, "outer_steps": self.outer_steps,
                "bytes_sent": self.bytes_sent, "start": {n: t.clone() for n, t in self.start.items()},
                "outer_opt": self.outer_opt.state_dict(),
                "errors": {n: t.clone() for n, t in self.errors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.method:
            raise DistributedError(f"state was saved by {state.get('method')!r}, this loop runs {self.method!r}.")
        self.inner_steps, self.outer_steps = int(state["inner_steps"]), int(state["outer_steps"])
        self.bytes_sent = int(state["bytes_sent"])
        with torch.no_grad():
            for n, t in state["start"].items():
                self.start[n].copy_(t)
            for op, n in zip(self.outer_params, self.params):
                op.data.copy_(self.start[n])
        self.outer_opt.load_state_dict(state["outer_opt"])
        for n, t in state.get("errors", {}).items():
            self.errors[n].copy_(t)
