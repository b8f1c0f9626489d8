"""Names for Dynamo placeholders: parameter FQNs recovered from `node._dynamo_source`.

Dynamo names a parameter placeholder after its access path (`L_self_dict_modules_...`); its source chain
(`L['self'].__dict__['_modules']['model']._parameters['weight']`) gives back the module path that
`model.named_parameters()` uses, which is what users see in warnings and the report.
"""

from __future__ import annotations

from torch import fx

_SKIP = {"_modules", "_parameters", "_buffers", "__dict__"}


def source_to_fqn(source: object) -> str:
    parts: list[str] = []
    while source is not None:
        member = getattr(source, "member", None)
        index = getattr(source, "index", None)
        if member is not None:
            parts.append(str(member))
        elif index is not None:
            parts.append(f"[{index}]" if isinstance(index, int) else str(index))
        source = getattr(source, "base", None)
    names = [p for p in reversed(parts) if p not in _SKIP]
    while names and names[0].startswith("["):  # the module reached as an argument (L['args'][0]) after a graph break
        names.pop(0)
    return ".".join(names).replace(".[", "[")


# gm.meta key: where each module that the graph's frame holds in a local sits in the model, by local name ("" for
# the model itself). A graph break inside a model compiles pieces of it (a decoder layer, the inner LlamaModel)
# whose sources start at such a local (`L['self']`, `L['___stack0']`).
MODULE_PATHS = "lowra_module_paths"


def _local_name(source: object) -> str | None:
    """The frame local a source starts from (`self` of `L['self']._modules['mlp']`)."""
    while getattr(source, "base", None) is not None:
        source = source.base
    return getattr(source, "local_name", None)


def placeholder_name(node: fx.Node) -> str:
    """The parameter name of a placeholder as the model names it (the path of the module its source starts from,
    before the source's name), or the placeholder's own name when it has no source."""
    source = getattr(node, "_dynamo_source", None)
    name = source_to_fqn(source) if source is not None else ""
    if not name:
        return str(node.target)
    owner = node.graph.owning_module
    path = owner.meta.get(MODULE_PATHS, {}).get(_local_name(source), "") if owner is not None else ""
    return f"{path}.{name}" if path else name


def packed_site_name(packed0: fx.Node, outer: dict[fx.Node, fx.Node]) -> str:
    """The weight's name of a packed op's site, from its first packed tensor (`....weight._lowra_packed[0]`);
    `outer` maps a checkpointed body's placeholders to the graph's."""
    return placeholder_name(outer.get(packed0, packed0)).removesuffix("._lowra_packed[0]")


def is_parameter(node: fx.Node) -> bool:
    """Whether a placeholder is a module's parameter (reached through some module's `_parameters`), not an
    activation or a buffer."""
    source = getattr(node, "_dynamo_source", None)
    while source is not None:
        if getattr(source, "member", None) == "_parameters" or getattr(source, "index", None) == "_parameters":
            return True
        source = getattr(source, "base", None)
    return False


def is_peft_factor(name: str) -> bool:
    """Whether a parameter name is a factor of a PEFT LoRA adapter (`...q_proj.lora_A.default.weight`): a linear
    of its own, never a base layer, even when the adapter is frozen (PEFT's `from_pretrained` for inference)."""
    return not {"lora_A", "lora_B"}.isdisjoint(name.split("."))
