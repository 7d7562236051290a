"""``prune_structured``: remove heads, MLP channels and whole blocks to a parameter budget.

The budget ``remove`` is a fraction of the decoder blocks' parameters (embedding, final norm and
LM head are not counted: SmolLM2's tied embedding is 21% of the model and stays). Steps:

1. **Blocks** (when asked): ShortGPT's Block Influence on the calibration data; the blocks whose
   output is most similar to their input go, taking ``block_share`` of the budget (all of it when
   blocks are the only kind).
2. **Width**: scores (:mod:`.scores`) on the remaining model. Plain ``transformers`` configs hold
   one width for all layers, so every layer loses the *same number* of heads and channels (each
   layer picks *which* by its own scores). How the budget splits between attention and MLP:
   ``allocation="uniform"`` takes the same fraction of each; ``"global"`` follows FLAP's
   adaptive search: scores are standardised per kind, all structures of all layers are ranked
   together, and the counts of each kind taken within the budget set the split.
3. **Heads, GQA-aware**: per layer, ``g`` whole KV groups (a KV head with its query heads) and
   ``r`` query heads of every remaining group, the ``(g, r)`` whose parameters come closest to
   the attention share; channels (multiples of ``channel_multiple``) fill the rest.
4. **Compensation** (FLAP; default with ``score="flap"``): the removed features' mean over the
   calibration tokens times their output columns is added to the ``o_proj`` / ``down_proj`` bias,
   so the layer's mean output is unchanged. The config then says ``attention_bias`` /
   ``mlp_bias`` and the projections of that kind that the model class builds with a bias carry
   one (zeros where they had none). A class that builds ``o_proj`` / ``down_proj`` without a bias
   whatever its config says (Mistral, Qwen2; Qwen3's MLP) would drop the compensation on reload:
   that is refused with a :class:`~sparsetorch.errors.ModelError` before anything changes
   (``compensate=False`` prunes it without compensation).

A budget that rounds to no structure at all raises :class:`~sparsetorch.errors.AllocationError`
naming the smallest ``remove`` that takes one. The plan lists every removed structure with its
score (lower goes first) and the layer's cut-off (the lowest score kept, where one ranking decides).

The result is an ordinary smaller model: ``save_pretrained`` writes a config with the new
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
``intermediate_size``, and ``AutoModelForCausalLM.from_pretrained`` loads it with no code of ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AllocationError, MethodError, close_matches
from . import arch
from .scores import NEEDS, SCORES, BlockTensors
from .stats import FeatureStats, block_influence, channel_stats, weight_grads

KINDS = ("heads", "channels", "blocks")
ALLOCATIONS = ("global", "uniform")


@dataclass
class StructuredResult:
    """What :func:`prune_structured` removed and why (``to_dict`` is the JSON pruning plan).

    ``layers``: one entry per remaining layer (``layer``, ``original_layer``) with, where removed,
    ``heads_removed`` / ``head_scores``, ``kv_heads_removed`` / ``kv_head_scores`` (a KV group's
    score: its query heads' plus its own), ``channels_removed`` / ``channel_scores``, and the
    cut-offs: ``channel_cutoff`` and ``kv_head_cutoff`` (the lowest score kept; every removed
    one scores at or below it) and ``head_cutoffs`` (per original KV head, the lowest query-head
    score kept in that group, ``None`` for a removed group: heads are ranked within each group).
    ``compensated`` is true only when some bias received a compensation."""

    score: str
    what: list[str]
    allocation: str
    remove: float
    compensated: bool
    params_before: int
    params_after: int
    total_params_before: int
    total_params_after: int
    config: dict[str, int]
    blocks_removed: list[dict[str, float]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        """Fraction of the decoder blocks' parameters actually removed."""
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "removed_fraction": self.removed_fraction}


def parse_what(what: str | Sequence[str]) -> tuple[str, ...]:
    """``"heads,channels"`` or a sequence -> the kinds in canonical order; MethodError if unknown."""
    items = [w.strip().lower() for w in (what.split(",") if isinstance(what, str) else what) if w.strip()]
    for w in items:
        if w not in KINDS:
            raise MethodError(f"unknown structure {w!r}; choose from {', '.join(KINDS)}." + close_matches(w, KINDS))
    if not items:
        raise MethodError(f"say what to remove: one or more of {', '.join(KINDS)}.")
    return tuple(k for k in KINDS if k in items)


def check_arguments(remove: float, score: str, what: str | Sequence[str], allocation: str,
                    block_share: float, channel_multiple: int) -> tuple[str, tuple[str, ...]]:
    """Validate everything that needs no model (the CLI calls this before loading one)."""
    if isinstance(remove, bool) or not isinstance(remove, (int, float)) or not 0 < remove < 1:
        raise AllocationError(f"remove must be a fraction of the decoder's parameters in (0, 1), got {remove!r}.")
    key = score.lower()
    if key not in SCORES:
        raise MethodError(f"unknown structure score {score!r}; choose from {', '.join(SCORES)}."
                          + close_matches(score, SCORES))
    if allocation not in ALLOCATIONS:
        raise AllocationError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}.")
    if not 0 < block_share <= 1:
        raise AllocationError(f"block_share must be in (0, 1], got {block_share!r}.")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise AllocationError(f"channel_multiple must be an integer >= 1, got {channel_multiple!r}.")
    return key, parse_what(what)


def _tensors(dec: arch.Decoder, i: int, attn: FeatureStats | None, mlp: FeatureStats | None,
             grads: dict[str, Tensor] | None) -> BlockTensors:
    a, m = dec.attn(i), dec.mlp(i)
    g = None
    if grads is not None:
        g = {k: grads[f"{i}.self_attn.{k}_proj.weight"] for k in "qkvo"}
        g.update({k: grads[f"{i}.mlp.{k}_proj.weight"] for k in ("gate", "up", "down") if f"{i}.mlp.{k}_proj.weight" in grads})
    return BlockTensors(
        q=a.q_proj.weight.detach(), k=a.k_proj.weight.detach(), v=a.v_proj.weight.detach(),
        o=a.o_proj.weight.detach(), gate=m.gate_proj.weight.detach() if dec.gated else None,
        up=m.up_proj.weight.detach(), down=m.down_proj.weight.detach(), head_dim=dec.head_dim,
        attn_stats=attn, mlp_stats=mlp, grads=g)


def _standardise(x: Tensor) -> Tensor:
    x = x.double()
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)


def head_options(dec: arch.Decoder) -> list[tuple[int, int, int]]:
    """Every GQA-consistent way to shrink one layer's attention: ``(params, g, r)`` for removing
    ``g`` whole KV groups and ``r`` query heads of each remaining group (at least one group with
    at least one head stays)."""
    G, K = dec.group, dec.kv_heads
    out = []
    for g in range(K):
        for r in range(G):
            q_removed = g * G + (K - g) * r
            out.append((q_removed * dec.head_cost() + g * dec.kv_cost(), g, r))
    return sorted(out)


def _split(dec: arch.Decoder, kinds: tuple[str, ...], allocation: str, budget: float,
           scores: list[tuple[Tensor, Tensor, Tensor]]) -> float:
    """Parameters per layer that attention should lose (the MLP takes the rest of the budget)."""
    L = len(dec.blocks)
    if "heads" not in kinds:
        return 0.0
    if "channels" not in kinds:
        return budget / L
    attn_params = dec.heads * dec.head_cost() + dec.kv_heads * dec.kv_cost()
    mlp_params = dec.intermediate * dec.channel_cost()
    if allocation == "uniform":
        return budget / L * attn_params / (attn_params + mlp_params)
    # global (FLAP): rank standardised head and channel scores of all layers together
    z_heads = _standardise(torch.cat([s[1] for s in scores]))
    z_ch = _standardise(torch.cat([s[0] for s in scores]))
    z = torch.cat([z_heads, z_ch])
    cost = torch.cat([torch.full_like(z_heads, float(dec.head_cost())), torch.full_like(z_ch, float(dec.channel_cost()))])
    order = torch.argsort(z, stable=True)
    taken = torch.cumsum(cost[order], 0) <= budget
    chosen = order[taken]
    n_heads = int((chosen < z_heads.numel()).sum())
    return n_heads * dec.head_cost() / L


def _check_width_fits(dec: arch.Decoder, kinds: tuple[str, ...], per_layer: float, multiple: int) -> None:
    """Fail before anything changes when heads/channels cannot take ``per_layer`` parameters."""
    width = [k for k in kinds if k != "blocks"]
    if not width or per_layer <= 0:
        return
    most = (head_options(dec)[-1][0] if "heads" in width else 0) + (
        (dec.intermediate - 1) // multiple * multiple * dec.channel_cost() if "channels" in width else 0)
    if per_layer > most:
        raise AllocationError(f"the budget asks {per_layer:.0f} parameters per layer of {', '.join(width)}; at most "
                              f"{most} can go while one head and one channel group stay: lower --remove or add kinds.")


def _pick_layer(dec: arch.Decoder, sc: tuple[Tensor, Tensor, Tensor], g: int, r: int,
                channels: int) -> tuple[list[int], list[int], Tensor]:
    """Per layer: the query heads and KV heads kept, and the channels kept (sorted indices)."""
    ch, heads, kv_extra = sc
    G = dec.group
    group_scores = heads.reshape(dec.kv_heads, G).sum(1) + kv_extra
    gone_groups = set(torch.argsort(group_scores, stable=True)[:g].tolist())
    keep_kv = [k for k in range(dec.kv_heads) if k not in gone_groups]
    keep_heads: list[int] = []
    for k in keep_kv:
        members = torch.arange(k * G, (k + 1) * G)
        order = torch.argsort(heads[members], stable=True)
        kept = sorted(members[order[r:]].tolist())
        keep_heads += kept
    keep_ch = torch.sort(torch.argsort(ch, stable=True)[channels:]).values
    return keep_heads, keep_kv, keep_ch


def _mean_out(w: Tensor, stats: FeatureStats, removed: Tensor) -> Tensor:
    """``W[:, removed] @ mean(X[removed])``: the removed features' mean contribution to the output."""
    return (w.double()[:, removed] @ stats.mean[removed].to(w.device)).to(w.dtype)


def _group_scores(dec: arch.Decoder, sc: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """A KV group's score: the sum of its query heads' scores plus the KV head's own (``kv_extra``)."""
    return sc[1].reshape(dec.kv_heads, dec.group).sum(1) + sc[2]


def _width_threshold(dec: arch.Decoder, width: Sequence[str], multiple: int) -> tuple[float, str]:
    """Parameters per layer above which width pruning of ``width`` surely removes a structure in
    every layer, and what that structure is. Counts are rounded to the nearest option (ties to the
    smaller), so the threshold is half of the smallest removal: ``multiple`` channels when channels
    are among the kinds (with heads too, a budget above it removes channels or heads), else the
    cheapest GQA-consistent head removal."""
    if "channels" in width:
        return multiple * dec.channel_cost() / 2, f"{multiple} MLP channels"
    options = head_options(dec)
    if len(options) < 2:
        return float("inf"), "head"
    cost, g, r = options[1]
    unit = (f"one query head of each of the {dec.kv_heads} KV groups" if g == 0 else
            f"one KV head with its {dec.group} query heads")
    return cost / 2, unit


def _too_small(dec: arch.Decoder, width: Sequence[str], remove: float, before: int, multiple: int) -> AllocationError:
    """The error for a budget that rounds to no structure at all, naming the smallest ``remove``
    (4 decimals, rounded up) that removes one."""
    per_layer, unit = _width_threshold(dec, width, multiple)
    smallest = math.floor(per_layer * len(dec.blocks) / before * 1e4) / 1e4 + 1e-4
    return AllocationError(
        f"remove {remove} rounds to no {'/'.join(width)} at all: every layer loses the same whole structures, the "
        f"smallest step being {unit} in every layer ({2 * per_layer:.0f} parameters per layer), and the budget is "
        f"rounded to the nearest step. The smallest --remove that removes one is {smallest:.4f}: pass at least that.")


def compensates(key: str, compensate: bool | None) -> bool:
    """Whether a run applies FLAP's bias compensation: ``compensate``, or by default with ``flap``."""
    return (key == "flap") if compensate is None else bool(compensate)


def check_model_compensation(dec: arch.Decoder, key: str, kinds: Sequence[str],
                             compensate: bool | None) -> set[str] | None:
    """When the run compensates width pruning: the projections the model class builds with a bias
    (:func:`arch.check_compensation`, a :class:`ModelError` when it would drop a compensated bias on
    reload); else None. Needs no data: the CLI calls it before the dense evaluation."""
    width = [k for k in kinds if k != "blocks"]
    return arch.check_compensation(dec, width) if width and compensates(key, compensate) else None


def prune_structured(
    model: nn.Module,
    remove: float,
    *,
    score: str = "flap",
    what: str | Sequence[str] = "channels",
    allocation: str = "global",
    calibration: Any = None,
    tokenizer: Any = None,
    num_samples: int = 32,
    seq_len: int = 512,
    batch_size: int = 4,
    compensate: bool | None = None,
    block_share: float = 0.5,
    channel_multiple: int = 8,
) -> StructuredResult:
    """Physically remove ``remove`` of the decoder blocks' parameters from ``model`` (in place).

    ``score``: magnitude, wanda, taylor or flap (:mod:`.scores`). ``what``: heads, channels and/or
    blocks. ``calibration`` / ``tokenizer`` / ``num_samples`` / ``seq_len``: as in one-shot pruning
    (default: the embedded calibration text). ``compensate`` (default: with flap) folds the removed
    features' mean into the output bias. Returns a :class:`StructuredResult` (the plan). Raises
    :class:`~sparsetorch.errors.AllocationError` for a budget that cannot be met (more heads than
    exist, a budget below one block) and :class:`~sparsetorch.errors.ModelError` for an
    architecture whose structures cannot be mapped.
    """
    t0 = time.perf_counter()
    key, kinds = check_arguments(remove, score, what, allocation, block_share, channel_multiple)
    dec = arch.decoder_of(model)
    comp = compensates(key, compensate)
    width = [k for k in kinds if k != "blocks"]
    biased = check_model_compensation(dec, key, kinds, compensate)  # before any work
    total_before = sum(p.numel() for p in model.parameters())
    before = dec.block_params()
    budget = remove * before
    L0 = len(dec.blocks)
    # every check that needs no data comes first: nothing is computed or changed before a refusal
    per_block = before / L0
    n = 0
    if "blocks" in kinds:
        share = budget if kinds == ("blocks",) else budget * block_share
        n = int(round(share / per_block))
        if kinds == ("blocks",) and n == 0:
            raise AllocationError(f"remove {remove} is less than half a block ({per_block / before:.3f} of the "
                                  "decoder each): remove more, or add heads/channels.")
        if n >= L0:
            raise AllocationError(f"remove {remove} would take all {L0} blocks; at most {L0 - 1} can go.")
        arch.check_blocks_removable(dec)
        _check_width_fits(dec, kinds, (budget - n * per_block) / (L0 - n), channel_multiple)
    if width and n == 0:
        floor = min(_width_threshold(dec, [k], channel_multiple)[0] for k in width)
        if budget / L0 <= floor < math.inf:  # rounds to no structure whatever the scores say
            raise _too_small(dec, width, remove, before, channel_multiple)

    needs_data = "blocks" in kinds or comp or NEEDS[key] is not None
    batches = None
    if needs_data:
        from ..oneshot.calibration import prepare_calibration

        batches = prepare_calibration(model, calibration, tokenizer, num_samples=num_samples, seq_len=seq_len,
                                      batch_size=batch_size)

    result_blocks: list[dict[str, float]] = []
    originals = list(range(L0))
    if n:
        influence = block_influence(dec, batches)
        gone = sorted(torch.argsort(torch.tensor(influence), stable=True)[:n].tolist())
        result_blocks = [{"index": i, "influence": influence[i]} for i in gone]
        arch.drop_blocks(dec, gone)
        originals = [i for i in originals if i not in set(gone)]
        budget -= before - dec.block_params()

    layers: list[dict[str, Any]] = []
    compensated = False
    if width and budget > 0.5 * dec.channel_cost():
        L = len(dec.blocks)
        attn_st = mlp_st = grads = None
        if NEEDS[key] == "stats" or comp:
            attn_st, mlp_st = channel_stats(dec, batches)
        if NEEDS[key] == "grads":
            grads = weight_grads(dec, batches)
        scores = [SCORES[key](_tensors(dec, i, attn_st[i] if attn_st else None, mlp_st[i] if mlp_st else None,
                                        grads)) for i in range(L)]
        attn_target = _split(dec, tuple(width), allocation, budget, scores)
        options = head_options(dec)
        cost, g, r = min(options, key=lambda o: (abs(o[0] - attn_target), o[0]))
        if "heads" in width and "channels" not in width and budget / L > options[-1][0]:
            raise AllocationError(
                f"removing {budget / L:.0f} parameters per layer from attention alone needs more heads than exist "
                f"({dec.heads} query / {dec.kv_heads} KV heads; at most {options[-1][0]} parameters per layer can go "
                "while one head stays): lower the budget or add channels/blocks.")
        m = channel_multiple
        c = 0
        if "channels" in width:
            c = max(0, int(round((budget / L - cost) / dec.channel_cost() / m)) * m)
            limit = (dec.intermediate - 1) // m * m
            if c > limit:
                raise AllocationError(f"the budget needs {c} of {dec.intermediate} MLP channels per layer; at most "
                                      f"{limit} can go: lower the budget or add heads/blocks.")
        shrinks = (g, r, c) != (0, 0, 0)
        if not shrinks and not result_blocks:
            raise _too_small(dec, width, remove, before, channel_multiple)
        for i in range(L if shrinks else 0):
            keep_heads, keep_kv, keep_ch = _pick_layer(dec, scores[i], g, r, c)
            ch_sc, head_sc, group_sc = scores[i][0], scores[i][1], _group_scores(dec, scores[i])
            entry: dict[str, Any] = {"layer": i, "original_layer": originals[i]}
            if (g, r) != (0, 0):
                gone_q = sorted(set(range(dec.heads)) - set(keep_heads))
                gone_kv = sorted(set(range(dec.kv_heads)) - set(keep_kv))
                o_add = None
                if comp:
                    o_add = _mean_out(dec.attn(i).o_proj.weight.detach(), attn_st[i],
                                      arch.head_rows(gone_q, dec.head_dim))
                    compensated = True
                arch.shrink_attention(dec, i, keep_heads, keep_kv, with_bias=bool(dec.config.attention_bias) if
                                      hasattr(dec.config, "attention_bias") else False, o_bias_add=o_add)
                entry["heads_removed"] = gone_q
                entry["head_scores"] = [float(head_sc[h]) for h in gone_q]
                entry["kv_heads_removed"] = gone_kv
                entry["kv_head_scores"] = [float(group_sc[k]) for k in gone_kv]
                if g:  # whole KV groups go by their group score: the lowest kept one is the cut-off
                    entry["kv_head_cutoff"] = float(min(group_sc[k] for k in keep_kv))
                if r:  # r query heads go from every kept group: a cut-off per group (None: group removed)
                    entry["head_cutoffs"] = [
                        float(min(head_sc[h] for h in keep_heads if h // dec.group == k)) if k in keep_kv else None
                        for k in range(dec.kv_heads)]
            if c:
                gone_ch = torch.tensor(sorted(set(range(dec.intermediate)) - set(keep_ch.tolist())), dtype=torch.long)
                d_add = None
                if comp:
                    d_add = _mean_out(dec.mlp(i).down_proj.weight.detach(), mlp_st[i], gone_ch)
                    compensated = True
                entry["channels_removed"] = gone_ch.tolist()
                entry["channel_scores"] = [float(v) for v in ch_sc[gone_ch].tolist()]
                entry["channel_cutoff"] = float(ch_sc[keep_ch].min())
                arch.shrink_mlp(dec, i, keep_ch.to(dec.mlp(i).down_proj.weight.device),
                                with_bias=bool(getattr(dec.config, "mlp_bias", False)), down_bias_add=d_add)
            layers.append(entry)
        if shrinks:
            new_heads = (dec.kv_heads - g) * (dec.group - r)
            arch.refresh_config(dec, new_heads, dec.kv_heads - g, dec.intermediate - c)
        if compensated:
            arch.set_biases(dec, attention=(g, r) != (0, 0), mlp=c > 0, biased=biased)
    cfg = dec.config
    return StructuredResult(
        score=key, what=list(kinds), allocation=allocation, remove=float(remove), compensated=compensated,
        params_before=before, params_after=dec.block_params(), total_params_before=total_before,
        total_params_after=sum(p.numel() for p in model.parameters()),
        config={"num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
                "head_dim": dec.head_dim, "intermediate_size": cfg.intermediate_size},
        blocks_removed=result_blocks, layers=layers, seconds=time.perf_counter() - t0)
