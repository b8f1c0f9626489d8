"""`lowra_compile.report(model)`: what the backend did to each layer, and which kernels ran.

Per quantized layer: shape, output channels per bit width, code bits and effective bits per weight
(codes + codebooks + scales + permutation), bytes before and after, and the kernel path(s) the
codegen log recorded for that layer's shape and rows per width (with time and throughput when timing was
requested; the log is process-wide, so layers alike in both share their entries, and `codegen.clear_log()`
starts it afresh), and the seconds spent quantizing it per stage (calibrate, quantize, plan, pack, loftq; the whole-model
stages shared equally between the layers they covered). Then the frozen linear weights that stay dense:
skipped (`skip`, lm_head by default; a mixture's routers unless `pack_routers`), left dense with a warning, or never seen by the backend because the
model calls them outside any compiled graph (PEFT's LoHa and LoKr layers call their base layer so).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from . import codegen
from .passes.fx_nodes import is_frozen_matrix
from .passes.release import ReleasedWeight, packed_weight
from .passes.sources import is_peft_factor
from .runtime.format import BIT_WIDTHS
from .wrappers import bare_model


@dataclass(frozen=True)
class LayerRow:
    """One packed layer: its parameter's name, its (out, in) shape, output channels per bit width, code bits
    and effective bits per weight (codes + codebooks + scales + permutation), bytes dense and packed, whether
    its dense weight was released, the kernel paths logged for it (Triton's, cuBLAS's or the reference's), and
    seconds per quantizing stage."""

    name: str
    shape: tuple[int, int]
    channels_per_bits: dict[int, int]
    code_bits: float
    effective_bits: float
    bytes_dense: int
    bytes_packed: int
    released: bool
    kernels: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)  # empty when loaded from a checkpoint


@dataclass(frozen=True)
class KernelReport:
    """What lowra did to a model (`lowra_compile.report(model)`): a `LayerRow` per packed layer, the kernel
    log's entries (op, bit widths, shape, calls), and the frozen linear weights left dense with why."""

    layers: tuple[LayerRow, ...]
    kernels: tuple[dict, ...] = field(default_factory=tuple)
    dense: tuple[str, ...] = ()  # frozen linear weights left dense
    dense_note: str = ""  # why some of them stay dense, and the fix, where the report can tell

    @property
    def params(self) -> int:
        """Weights in the packed layers."""
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    def _weighted(self, attr: str) -> float:
        total = self.params
        return sum(getattr(r, attr) * r.shape[0] * r.shape[1] for r in self.layers) / total if total else 0.0

    @property
    def code_bits(self) -> float:
        """Mean code bits per weight of the packed layers (the budget the plan met)."""
        return self._weighted("code_bits")

    @property
    def effective_bits(self) -> float:
        """Mean bits per weight stored: codes, codebooks, group scales and permutation."""
        return self._weighted("effective_bits")

    @property
    def bytes_dense(self) -> int:
        """Bytes the packed layers' weights took dense, in their dtype."""
        return sum(r.bytes_dense for r in self.layers)

    @property
    def bytes_packed(self) -> int:
        """Bytes the packed layers take now."""
        return sum(r.bytes_packed for r in self.layers)

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds spent quantizing these layers, per stage."""
        total: dict[str, float] = {}
        for r in self.layers:
            for stage, t in r.seconds.items():
                total[stage] = total.get(stage, 0.0) + t
        return total

    def summary(self) -> dict:
        """The totals as a dict (what `to_json` puts under "summary")."""
        return {
            "layers": len(self.layers),
            "params": self.params,
            "code_bits": round(self.code_bits, 4),
            "effective_bits": round(self.effective_bits, 4),
            "bytes_dense": self.bytes_dense,
            "bytes_packed": self.bytes_packed,
            "channels_per_bits": {b: sum(r.channels_per_bits[b] for r in self.layers) for b in BIT_WIDTHS},
            "seconds": {stage: round(t, 3) for stage, t in self.seconds.items()},
            "dense": list(self.dense),
            "dense_note": self.dense_note,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The summary, every layer's row and the kernel log, as JSON."""
        return json.dumps(
            {"summary": self.summary(), "layers": [asdict(r) for r in self.layers], "kernels": list(self.kernels)},
            indent=indent,
            default=str,
        )

    def _table(self, sep: str, markdown: bool) -> list[str]:
        head = ["layer", "shape", "1b/2b/3b/4b channels", "code bits", "eff. bits", "MiB dense->packed", "kernel"]
        rows = [
            [
                r.name,
                f"{r.shape[0]}x{r.shape[1]}",
                "/".join(str(r.channels_per_bits[b]) for b in BIT_WIDTHS),
                f"{r.code_bits:.3f}",
                f"{r.effective_bits:.3f}",
                f"{r.bytes_dense / 2**20:.2f}->{r.bytes_packed / 2**20:.2f}" + ("" if r.released else " (dense kept)"),
                ", ".join(r.kernels) or "-",
            ]
            for r in self.layers
        ]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            return lines + ["| " + " | ".join(row) + " |" for row in rows]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda row: sep.join(x.ljust(w) for x, w in zip(row, widths))  # noqa: E731
        return [fmt(head), "-" * (sum(widths) + len(sep) * (len(widths) - 1))] + [fmt(row) for row in rows]

    def _footer(self) -> str:
        s = self.summary()
        return (
            f"{s['layers']} layers, {s['params']:,} weights: {s['code_bits']:.3f} code bits, "
            f"{s['effective_bits']:.3f} effective bits per weight; "
            f"{s['bytes_dense'] / 2**20:.1f} MiB dense -> {s['bytes_packed'] / 2**20:.1f} MiB packed"
            + self._seconds_text()
            + self._dense_text()
        )

    def _dense_text(self) -> str:
        if not self.dense:
            return ""
        listed = ", ".join(self.dense[:3]) + (f" and {len(self.dense) - 3} more" if len(self.dense) > 3 else "")
        note = f"\n{self.dense_note}" if self.dense_note else ""
        return f"\n{len(self.dense)} frozen linear weight(s) stay dense: {listed}{note}"

    def _seconds_text(self) -> str:
        if not self.seconds:
            return ""
        stages = ", ".join(f"{stage} {t:.1f}" for stage, t in self.seconds.items())
        return f"; quantized in {sum(self.seconds.values()):.1f} s ({stages})"

    def __str__(self) -> str:
        return "\n".join(["lowra kernel report", *self._table("  ", False), self._footer()])

    def to_markdown(self) -> str:
        """The table of `str(report)` in Markdown, with its footer."""
        return "\n".join([*self._table(" | ", True), "", self._footer()])

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: code bits per layer (stacked channel shares per width) and kernel times when measured."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed = [k for k in self.kernels if k.get("time_ms") is not None]
        fig, axes = plt.subplots(2 if timed else 1, 1, figsize=(max(8, len(self.layers) * 0.15), 7 if timed else 4))
        ax = axes[0] if timed else axes
        bottom = [0.0] * len(self.layers)
        for b in BIT_WIDTHS:
            share = [b * r.channels_per_bits[b] / r.shape[0] for r in self.layers]
            ax.bar(range(len(self.layers)), share, bottom=bottom, label=f"{b}-bit channels")
            bottom = [x + y for x, y in zip(bottom, share)]
        ax.set_ylabel("code bits per weight")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        if timed:
            labels = [f"{k.get('path')} {k.get('M')}x{k.get('K')}x{k.get('N')}" for k in timed]
            axes[1].barh(labels, [k["time_ms"] for k in timed])
            axes[1].set_xlabel("ms")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _layer_key(n: int, k: int, rows_per_width: dict[int, int]) -> tuple:
    """What the kernel log knows of a layer: its packed shape and its non-empty bit groups."""
    return n, k, tuple(sorted((b, r) for b, r in rows_per_width.items() if r))


def _kernels_by_layer(log: list[dict]) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = {}
    for rec in log:
        key = _layer_key(rec.get("N"), rec.get("K"), rec.get("bits", {}))
        label = f"{rec.get('op', '?')}:{rec.get('path', '?')}"
        if rec.get("config"):
            label += f"[{rec['config']}]"
        if rec.get("time_ms") is not None:
            label += f" M={rec.get('M')} {rec['time_ms']:.3f}ms"
            if rec.get("tflops"):
                label += f" {rec['tflops']:.1f}TFLOP/s"
            elif rec.get("gbps"):
                label += f" {rec['gbps']:.0f}GB/s"
        if label not in out.setdefault(key, []):
            out[key].append(label)
    return out


def report(model: torch.nn.Module) -> KernelReport:
    """The kernel report of a model compiled with `backend="lowra"` (or quantized with `quantize_`)."""
    log = list(codegen.kernel_log())
    by_layer = _kernels_by_layer(log)
    rows = []
    model = bare_model(model)
    for name, p in model.named_parameters(remove_duplicate=True):
        pw = packed_weight(p)
        if pw is None:
            continue
        n, k = pw.shape
        rows.append(
            LayerRow(
                name=name,
                shape=(n, k),
                channels_per_bits=pw.rows_per_width(),
                code_bits=pw.code_bits(),
                effective_bits=pw.effective_bits(),
                bytes_dense=n * k * torch.empty((), dtype=pw.dtype).element_size(),
                bytes_packed=pw.nbytes(),
                released=isinstance(p, ReleasedWeight),
                kernels=tuple(by_layer.get(_layer_key(n, k, pw.rows_per_width()), ())),
                seconds=dict(getattr(p, "_lowra_seconds", {})),
            )
        )
    dense = tuple(name for name, _ in dense_linear_weights(model))
    return KernelReport(tuple(rows), tuple(log), dense, _dense_note(model, dense))


def dense_linear_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of the frozen floating-point weights of linear layers (torch.nn.Linear, transformers'
    Conv1D, a mixture's *Router modules, which call F.linear on their own weight, torch.nn.MultiheadAttention's
    in-projections) and of a mixture's stacked
    experts (the 3-D parameters of its *Experts modules, PEFT's parametrized originals too) that have no packed
    form (a frozen LoRA adapter's factors are not base layers); a weight two modules share is listed under both."""
    weights = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = type(module).__name__
        linear = isinstance(module, torch.nn.Linear) or kind == "Conv1D" or kind.lower().endswith("router")
        if linear and not is_peft_factor(name) and is_frozen_matrix(weight) and packed_weight(weight) is None:
            weights.append((f"{name}.weight".removeprefix("."), weight))
        if isinstance(module, torch.nn.MultiheadAttention):  # its in-projection is a parameter of its own
            weights += [(f"{name}.{pname}".removeprefix("."), p) for pname, p in module.named_parameters(recurse=False)
                        if pname.endswith("proj_weight") and is_frozen_matrix(p) and packed_weight(p) is None]
        if kind.endswith("Experts"):  # Parametrized<Name>Experts too, under PEFT's LoRA on the experts
            weights += [(f"{name}.{pname}".removeprefix("."), p) for pname, p in module.named_parameters()
                        if not is_peft_factor(pname) and is_frozen_matrix(p, dims=(3,)) and packed_weight(p) is None]
    return weights


# PEFT's DoRA clears a cache dict on its module on every call: a side effect Dynamo refuses inside a
# checkpointed region, so the whole region runs eagerly. Clearing an empty cache again in the backward's
# recomputation changes nothing, so skipping it there is safe for DoRA (Dynamo's own hint).
_DORA_UNDER_CHECKPOINTING = (
    "PEFT's DoRA layers under activation checkpointing run outside the compiled graphs (DoRA clears a cache on "
    "every call, a side effect Dynamo refuses inside a checkpointed region), so their base weights stay dense. "
    "Set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True before the first step, or "
    "train DoRA without gradient checkpointing."
)


def _dense_note(model: torch.nn.Module, dense: tuple[str, ...]) -> str:
    """Why weights of `dense` stay dense, where a known cause applies: DoRA layers under checkpointing."""
    modules = dict(model.named_modules())
    dora = [n for n in dense if getattr(modules.get(n.removesuffix(".base_layer.weight")), "lora_magnitude_vector", None)]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in modules.values())
    return _DORA_UNDER_CHECKPOINTING if dora and checkpointing else ""
