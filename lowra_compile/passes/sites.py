"""What `match` finds in a graph: a `LinearSite` per frozen linear, with the LoRA branch on it
(`LoraBranch`) that `rewrite` fuses into the packed op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

if TYPE_CHECKING:
    from .match_dora import DoraRead
    from .match_experts import ExpertsLora


@dataclass
class LoraBranch:
    """The nodes of one LoRA branch: x_lora feeds linear(A); `add` is the node whose value the site replaces."""

    x_lora: fx.Node
    lora_a: fx.Node
    lora_b: fx.Node
    scaling: float | fx.Node
    nodes: tuple[fx.Node, ...]  # linear(A), linear(B), mul, add: replaced by the fused op
    add: fx.Node
    b_bias: fx.Node | None = None  # B's bias (PEFT's lora_bias), added after the fused op times the scaling


@dataclass
class LinearSite:
    """One frozen linear. `weight_index` is the position of W in the top-level placeholders (= example_inputs).

    The nodes belong to the top-level graph, or to the body of the checkpoint call `scope`.
    """

    name: str
    base: fx.Node
    x: fx.Node
    bias: fx.Node | None
    weight: fx.Node | None  # placeholder of the dense weight (None for an already packed op)
    weight_index: int | None
    packed: list[fx.Node] | None  # packed tensor nodes of an existing lowra op
    group_size: int | None  # of an existing lowra op
    lora: LoraBranch | None
    shape: tuple[int, int]
    scope: fx.Node | None = None  # the checkpoint call whose body holds the site (None: the top-level graph)
    transposed: bool = False  # the weight is stored (in, out) and read as linear(x, t(W)): GPT-2's Conv1D
    experts: int = 0  # a grouped site: E experts stacked in one [E, N, K] weight, packed as [E*N, K] (shape)
    offsets: fx.Node | None = None  # of a grouped site: each expert's cumulative end row in x
    erased: tuple[fx.Node, ...] = ()  # of a grouped site: (dequant, view,) transpose of its weight, to drop
    experts_lora: ExpertsLora | None = None  # of a grouped site: PEFT's LoRA on the experts themselves
    dora: DoraRead | None = None  # PEFT's DoRA reads of the weight besides the linear

    @property
    def adapter(self) -> LoraBranch | DoraRead | None:
        """The LoRA factors on this layer that LoftQ may start: the fused branch's, or DoRA's (with its
        magnitude)."""
        if self.lora is not None:
            return self.lora
        return self.dora if self.dora is not None and self.dora.magnitude is not None else None

    @property
    def output(self) -> fx.Node:
        return self.lora.add if self.lora else self.base
