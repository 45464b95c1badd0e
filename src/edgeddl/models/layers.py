"""A model as an ordered list of named layers, and a split of it at a cut.

Split learning runs the front of a network on each device and the rear on the coordinator
(optionally the head back on the device: U-shaped, so labels never leave it). A cut can go
between any two consecutive layers of this list, named by layer name or index. Parts share
the original modules (no copies), so the whole model stays one model for evaluation.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn


def model_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model` as consecutive named layers: an `nn.Sequential`'s children, or what the
    model's own `layers()` returns (the zoo's ResNets)."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    layers = getattr(model, "layers", None)
    if callable(layers):
        return list(layers())
    raise ValueError(
        f"a {type(model).__name__} cannot be split: give an nn.Sequential, or a model with "
        "a layers() method listing its consecutive (name, module) layers"
    )


def resolve_cut(layers: list[tuple[str, nn.Module]], cut: str | int) -> int:
    """How many layers go before the cut; `cut` names the last layer before it, or gives its
    index (negative counts from the end)."""
    names = [n for n, _ in layers]
    if isinstance(cut, int):
        index = cut if cut >= 0 else len(layers) + cut
        if not 0 <= index < len(layers) - 1:
            raise ValueError(
                f"cut index {cut} leaves no layer on one side; allowed: 0..{len(layers) - 2} "
                f"(the last layer before the cut) or -2..-{len(layers)}"
            )
    else:
        if cut not in names:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"no layer named {cut!r}; the layers are: {shown}")
        index = names.index(cut)
        if index == len(layers) - 1:
            raise ValueError(f"cut after {cut!r}, the last layer, leaves nothing behind it")
    return index + 1


@dataclass(frozen=True, slots=True)
class SplitModel:
    """The parts of a model at its cut(s); each part shares the original's modules."""

    front: nn.Sequential
    """On the device: from the input to the cut."""
    rear: nn.Sequential
    """On the coordinator: from the cut on (up to the head cut, if any)."""
    head: nn.Sequential | None = None
    """U-shaped: the last layers, back on the device (labels stay there)."""


def split_model(model: nn.Module, cut: str | int, head_cut: str | int | None = None) -> SplitModel:
    """`model` split after layer `cut` and, U-shaped, again after layer `head_cut`."""
    layers = model_layers(model)
    at = resolve_cut(layers, cut)
    end = len(layers)
    if head_cut is not None:
        end = resolve_cut(layers, head_cut)
        if end <= at:
            raise ValueError(
                f"the head cut ({head_cut!r}) must come after the cut ({cut!r}): the "
                "coordinator's part would be empty"
            )
    front = nn.Sequential(OrderedDict(layers[:at]))
    rear = nn.Sequential(OrderedDict(layers[at:end]))
    head = nn.Sequential(OrderedDict(layers[end:])) if head_cut is not None else None
    return SplitModel(front, rear, head)
