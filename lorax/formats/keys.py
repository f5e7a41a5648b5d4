"""The key grammar of every LoRA/embedding format: standard library only (detection: ``lorax.formats.registry``).

``lorax inspect`` works from safetensors headers through this module alone, without importing torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lorax.errors import ErrorPath, FormatError
from lorax.models import families

# --- kohya / LyCORIS -------------------------------------------------------------------------------------------
BUNDLE = "bundle_emb."
LORA_SUFFIXES = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
LYCORIS_SUFFIXES = frozenset(
    {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "dora_scale", "lora_mid.weight", "diff", "diff_b", "on_input",
    }
)  # fmt: skip


def kohya_split(key: str) -> tuple[str, str, str] | None:
    """``lora_unet_x_y.lora_down.weight`` → ``("unet", "x_y", "lora_down.weight")``; ``None`` if not kohya-named."""
    name, _, suffix = key.partition(".")
    for prefix, component in families.kohya_prefixes().items():
        if name.startswith(prefix) and suffix:
            return component, name[len(prefix) :], suffix
    return None


def kohya_groups(keys: Iterable[str]) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """Group keys by module: ``{(component, flat): {suffix: key}}``, plus the keys that fit no module."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    rest: list[str] = []
    for key in keys:
        parts = kohya_split(key)
        if parts is None:
            rest.append(key)
            continue
        component, flat, suffix = parts
        groups.setdefault((component, flat), {})[suffix] = key
    return groups, rest


# --- diffusers / PEFT ------------------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."
_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0", "add_k_proj": "add_k_proj",
         "add_v_proj": "add_v_proj"}  # fmt: skip
_TE_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_ADAPTER = r"(?:\.[A-Za-z_][\w-]*)?"
_DIFFUSERS_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^(?P<p>.+)\.lora_A{_ADAPTER}\.weight$"), "A"),
    (re.compile(rf"^(?P<p>.+)\.lora_B{_ADAPTER}\.weight$"), "B"),
    (re.compile(r"^(?P<p>.+)\.processor\.(?P<n>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(?P<r>down|up)\.weight$"), "proc"),
    (re.compile(r"^(?P<p>.+self_attn)\.(?P<n>to_q|to_k|to_v|to_out)_lora\.(?P<r>down|up)\.weight$"), "te_old"),
    (re.compile(r"^(?P<p>.+)\.lora(?:_linear_layer)?\.(?P<r>down|up)\.weight$"), "lora"),
    (re.compile(rf"^(?P<p>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$"), "magnitude"),
    (re.compile(r"^(?P<p>.+)\.alpha$"), "alpha"),
]  # fmt: skip
_UNET_ROOTS = (
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
)
_TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")


def _strip_component(key: str) -> tuple[str | None, str]:
    for component in families.all_components():
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    if key.startswith(PEFT_PREFIX):
        return None, key[len(PEFT_PREFIX) :]
    return None, key


def diffusers_parse(key: str) -> tuple[str, str, str] | None:
    """``key`` → ``(component, on-disk module path, role)``; role is ``down``, ``up``, ``alpha`` or ``magnitude``."""
    component, body = _strip_component(key)
    for pattern, kind in _DIFFUSERS_PATTERNS:
        m = pattern.match(body)
        if m is None:
            continue
        module = m.group("p")
        if kind == "A":
            role = "down"
        elif kind == "B":
            role = "up"
        elif kind == "proc":
            module, role = f"{module}.{_PROC[m.group('n')]}", m.group("r")
        elif kind == "te_old":
            module, role = f"{module}.{_TE_OLD[m.group('n')]}", m.group("r")
        elif kind == "lora":
            role = m.group("r")
        else:
            role = kind
        if component is None:
            root = module.split(".", 1)[0]
            component = "unet" if root in _UNET_ROOTS else "text_encoder" if root in _TEXT_ROOTS else None
        if component is None:
            return None
        return component, families.live_to_disk(component, module), role
    return None


METADATA_KEY = "lora_adapter_metadata"


def component_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The per-component LoraConfig kwargs packed in diffusers' ``lora_adapter_metadata`` header."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError(f"header {METADATA_KEY} is not valid JSON") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        component, dot, field = key.partition(".")
        if dot and component in families.all_components():
            out.setdefault(component, {})[field] = value
        else:  # an unprefixed config (a single model's adapter)
            out.setdefault("", {})[key] = value
    return out


def _pattern_value(patterns: Mapping[str, Any], candidates: list[str]) -> Any:
    """PEFT's ``get_pattern_key``: a pattern matches a module name that ends with ``.<pattern>`` or equals it."""
    for pattern, value in patterns.items():
        for name in candidates:
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
    return None


def finite_alpha(value: Any, what: str, path: ErrorPath = None) -> float:
    """An alpha a file gives (a tensor, or a JSON value from a header): one finite number, or a ``FormatError`` naming
    ``what`` (its key) and the file. The one rule for every format's alphas."""
    import math

    from lorax.errors import FormatError

    shape = getattr(value, "shape", None)
    if shape is not None:  # a tensor
        if value.numel() != 1:
            raise FormatError(f"{what} must hold one number, it has shape {list(shape)}", path=path)
        number = float(value.float().item())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise FormatError(f"{what} must be a number, not {value!r:.40}", path=path)
    if not math.isfinite(number) or abs(number) > 3.4028234663852886e38:
        raise FormatError(f"{what} is {number:g} (an alpha must be a finite number)", path=path)
    return number


def module_alpha(
    config: Mapping[str, Any], module_path: str, rank: int, *, component: str = "", path: ErrorPath = None
) -> float:
    """The effective alpha (``scale · r``) PEFT would use for one module under ``config``."""
    candidates = [module_path]
    if module_path.startswith("text_model."):
        candidates.append(module_path[len("text_model.") :])
    where = f"{component}." if component else ""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, Mapping):
        from lorax.errors import FormatError

        raise FormatError(f"lora_adapter_metadata's {where}alpha_pattern must be a JSON object", path=path)
    alpha = _pattern_value(patterns, candidates)
    what = f"lora_adapter_metadata's {where}alpha_pattern for {module_path}"
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
        what = f"lora_adapter_metadata's {where}lora_alpha"
    alpha = finite_alpha(alpha, what, path)
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return alpha


# --- lora_diffusion --------------------------------------------------------------------------------------------
LORA_DIFFUSION_KEY = re.compile(r"^(?P<c>unet|text_encoder|text_encoder_2):(?P<i>\d+):(?P<r>up|down)$")

FLUX_FAMILY = "flux"


def flux_variant(keys: Sequence[str]) -> str | None:
    """The Flux LoRA layout of a file's keys (``kohya``, ``xlabs``, ``bfl``, ``diffusers``), or ``None`` when the
    keys name no module only Flux has (``lorax.formats.flux`` reads every layout)."""
    if FLUX_FAMILY not in families.names() or families.detect(lora_keys=keys) != FLUX_FAMILY:
        return None
    # kohya: its transformer names, or only its text-encoder names (a BFL file keeps kohya's names for those)
    if any(k.startswith("lora_unet_") for k in keys) or all(re.match(r"lora_te\d?_", k) for k in keys):
        return "kohya"
    if not any("lora" in k.lower() for k in keys):  # a Flux model's own weights (BFL single file), not a LoRA
        return None
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(re.search(r"(^|\.)(double|single)_blocks\.\d", k) for k in keys):
        return "bfl"
    return "diffusers"
