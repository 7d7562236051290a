"""Find the decoder blocks of a causal LM and run them one at a time.

Blocks are found without per-architecture code: the ``nn.ModuleList`` whose children all have
the same class and that holds the most parameters (``model.layers`` in Llama/Qwen/Mistral/Phi,
``transformer.h`` in GPT-2, ``model.decoder.layers`` in OPT). The inputs of block 0 are captured
with a forward pre-hook that records the hidden states together with *every* other positional
and keyword argument (attention mask, position ids, rotary ``position_embeddings`` ...) and then
stops the forward pass; the KV cache is disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError

_CACHE_KW = ("past_key_value", "past_key_values", "layer_past")


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, module_list)`` of the repeated decoder blocks; ModelError if none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1:
            continue
        child = mod[0]
        if not any(
            isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in child.modules()
        ):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ModelError(
            f"{type(model).__name__} has no decoder blocks: one-shot pruning with calibration data needs a "
            "model whose transformer blocks sit in an nn.ModuleList of identical layers (Hugging Face causal "
            "LMs: Llama, Qwen, Mistral, GPT-2, OPT, Phi ...). For other models use method='magnitude'."
        )
    return best[1], best[2]


@dataclass
class BlockInputs:
    """Inputs of the current block, one entry per calibration batch."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    token_masks: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def clone(self) -> BlockInputs:
        return BlockInputs(
            [h.clone() for h in self.hidden],
            list(self.args),
            list(self.kwargs),
            list(self.token_masks),
        )


def _sanitize(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for k in _CACHE_KW:
        if k in out:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    if "output_attentions" in out:
        out["output_attentions"] = False
    return out


@torch.no_grad()
def capture_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, Tensor]]
) -> BlockInputs:
    """Run the model up to block 0 for every batch and record that block's full input."""
    got = BlockInputs()
    device = next(model.parameters()).device

    def hook(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        rest = tuple(None if _is_cache(a) else a for a in rest)
        got.hidden.append(hidden.detach())
        got.args.append(rest)
        got.kwargs.append(_sanitize(kwargs))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            inputs = {k: v.to(device) for k, v in b.items()}
            got.token_masks.append(
                inputs["attention_mask"].bool() if "attention_mask" in inputs else None
            )
            try:
                try:
                    model(**inputs, use_cache=False)
                except TypeError:
                    model(**inputs)
            except _Stop:
                pass
            else:
                raise ModelError(
                    f"block 0 of {type(model).__name__} was never called during the forward pass."
                )
    finally:
        h.remove()
    return got


def _is_cache(a: Any) -> bool:
    return a is not None and "Cache" in type(a).__name__


def block_output(out: Any) -> Tensor:
    """The hidden states from whatever a block returns (tensor, tuple, or ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise ModelError(f"cannot read hidden states from a block output of type {type(out).__name__}.")


def run_block(block: nn.Module, inputs: BlockInputs, i: int) -> Tensor:
    return block_output(block(inputs.hidden[i], *inputs.args[i], **inputs.kwargs[i]))
