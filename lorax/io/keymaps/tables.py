"""Prefix tables between diffusers names and the original (LDM/SGM) single-file names.

Each ``Rule`` maps one module prefix on the diffusers side to one on the single-file side, with renames of the
first names below it (a resnet's ``norm1`` is ``in_layers.0``). The tables are computed from a layout, never typed
out per model size; ``PrefixMapper`` applies them in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorax.io.keymaps.layout import UnetLayout, VaeLayout

RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
# Names older diffusers releases wrote for the VAE attention (read only).
VAE_ATTENTION_LEGACY = (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))
# VAE attention projections are 1x1 convolutions in the original layout and linear layers in diffusers.
VAE_CONV1X1 = frozenset({"q", "k", "v", "proj_out"})


@dataclass(frozen=True)
class Rule:
    diffusers: str  # module prefix ending in "."
    single: str
    inner: tuple[tuple[str, str], ...] = ()
    conv1x1: frozenset[str] = frozenset()  # single-side inner names whose weight is [out, in, 1, 1]


def unet_rules(layout: UnetLayout) -> list[Rule]:
    rules = [
        Rule("time_embedding.linear_1.", "time_embed.0."),
        Rule("time_embedding.linear_2.", "time_embed.2."),
        Rule("add_embedding.linear_1.", "label_emb.0.0."),
        Rule("add_embedding.linear_2.", "label_emb.0.2."),
        Rule("conv_in.", "input_blocks.0.0."),
        Rule("conv_norm_out.", "out.0."),
        Rule("conv_out.", "out.2."),
    ]
    n, lpb = layout.levels, layout.layers_per_block
    for i in range(n):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            rules.append(Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", RESNET))
            if layout.down_attention[i]:
                rules.append(Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < n - 1:
            k = 1 + i * (lpb + 1) + lpb
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
    rules.append(Rule("mid_block.resnets.0.", "middle_block.0.", RESNET))
    if layout.mid_attention:
        rules.append(Rule("mid_block.attentions.0.", "middle_block.1."))
        rules.append(Rule("mid_block.resnets.1.", "middle_block.2.", RESNET))
    else:
        rules.append(Rule("mid_block.resnets.1.", "middle_block.1.", RESNET))
    for i in range(n):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", RESNET))
            if layout.up_attention[i]:
                rules.append(Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        if i < n - 1:
            k = i * (lpb + 1) + lpb
            slot = 2 if layout.up_attention[i] else 1
            rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{slot}.conv."))
    return rules


def vae_rules(layout: VaeLayout) -> list[Rule]:
    rules = [Rule("quant_conv.", "quant_conv."), Rule("post_quant_conv.", "post_quant_conv.")]
    n, lpb = layout.levels, layout.layers_per_block
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
            Rule(
                f"{part}.mid_block.attentions.0.",
                f"{part}.mid.attn_1.",
                VAE_ATTENTION + VAE_ATTENTION_LEGACY,
                VAE_CONV1X1,
            ),
        ]
    for i in range(n):
        for j in range(lpb):
            rules.append(
                Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
            )
        if i < n - 1:
            rules.append(
                Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.")
            )
    for i in range(n):
        b = n - 1 - i
        for j in range(lpb + 1):
            rules.append(
                Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{b}.block.{j}.", VAE_RESNET)
            )
        if i < n - 1:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{b}.upsample.conv."))
    return rules


def _rename(rest: str, pairs: tuple[tuple[str, str], ...]) -> tuple[str, str | None]:
    """Rename the leading names of ``rest`` by the first matching pair; returns (new rest, new leading name)."""
    for old, new in pairs:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :], new
    return rest, None


class PrefixMapper:
    """Applies a list of ``Rule``s to whole tensor keys, in either direction, by longest module prefix."""

    def __init__(self, rules: list[Rule]) -> None:
        self._d2s = {r.diffusers: r for r in rules}
        self._s2d = {r.single: r for r in rules}

    @staticmethod
    def _find(key: str, table: dict[str, Rule]) -> Rule | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            rule = table.get(".".join(parts[:n]) + ".")
            if rule is not None:
                return rule
        return None

    def to_single(self, key: str) -> tuple[str, bool] | None:
        """(single key, whether the single tensor is a 1x1 conv of the diffusers linear weight), or None."""
        rule = self._find(key, self._d2s)
        if rule is None:
            return None
        rest, name = _rename(key[len(rule.diffusers) :], rule.inner)
        conv = name in rule.conv1x1 and rest.endswith(".weight")
        return rule.single + rest, conv

    def to_diffusers(self, key: str) -> tuple[str, bool] | None:
        rule = self._find(key, self._s2d)
        if rule is None:
            return None
        swapped = tuple((b, a) for a, b in rule.inner if (a, b) not in VAE_ATTENTION_LEGACY)
        rest, name = _rename(key[len(rule.single) :], swapped)
        old = dict((b, a) for a, b in swapped)
        conv = old.get(name or "", "") in rule.conv1x1 and rest.endswith(".weight")
        return rule.diffusers + rest, conv
