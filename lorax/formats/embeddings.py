"""Learned token embeddings (textual inversion).

* ``a1111-embedding``: AUTOMATIC1111 ``.pt`` — ``{"string_to_param": {"*": [n, dim]}, "name": token, …}`` — or
  ``.safetensors`` with one tensor ``emb_params [n, dim]``; the token is the ``name`` field, else the file's stem.
* ``sdxl-embedding``: ``.safetensors`` with ``clip_l [n, 768]`` (text_encoder) and ``clip_g [n, 1280]``
  (text_encoder_2); the token is the file's stem.
* ``diffusers-embedding``: ``learned_embeds.safetensors`` (or lora_diffusion's ``.ti.pt``): ``{token: [dim]}`` or
  ``{token: [n, dim]}``, for the first text encoder.

In memory: ``{token: {component: Tensor[n_vectors, dim]}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import ErrorPath, FormatError
from lorax.models import families

if TYPE_CHECKING:
    import torch

Embeddings = dict[str, dict[str, "torch.Tensor"]]


def _slots() -> dict[str, str]:
    """``{clip_l: text_encoder, clip_g: text_encoder_2}``: the families' embedding-file slots."""
    return families.embedding_keys()


def _first() -> str:
    """The first text encoder, which single-encoder embedding formats feed."""
    return families.embedding_component()


def trained_token(metadata: Mapping[str, str] | None) -> str | None:
    """The token a lorax-written one-token file was trained for (``lorax_tokens`` in its header), if any."""
    raw = (metadata or {}).get("lorax_tokens")
    if not raw:
        return None
    try:
        tokens = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], str) and tokens[0]:
        return tokens[0]
    return None


def file_token(path: ErrorPath, metadata: Mapping[str, str] | None = None) -> str:
    """The token of a file named by its file (A1111 ``emb_params``, SDXL ``clip_l``/``clip_g``): the trained token
    lorax wrote into the header, else the file's stem (A1111's and ComfyUI's trigger in both cases)."""
    return trained_token(metadata) or _token_from_path(path)


def _token_from_path(path: ErrorPath) -> str:
    name = Path(str(path)).name if path is not None else "embedding"
    for suffix in (".safetensors", ".pt", ".bin", ".ti"):
        name = name.removesuffix(suffix)
    return name


def _vectors(t: Any, what: str, path: ErrorPath) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2) or not t.is_floating_point():
        raise FormatError(f"{what} is not a [n, dim] float tensor", path=path)
    return t.reshape(1, -1) if t.dim() == 1 else t


def read(
    content: Any, fmt: str, *, path: ErrorPath = None, metadata: Mapping[str, str] | None = None
) -> Embeddings:
    """An embedding file's content (tensor dict or unpickled object) → ``{token: {component: [n, dim]}}``.

    Files named by their file take the trained token from ``metadata`` when lorax wrote one (``file_token``).
    """
    if not isinstance(content, Mapping):
        raise FormatError("an embedding file must hold a mapping of tensors", path=path)
    if fmt == "a1111-embedding":
        if "emb_params" in content:
            return {
                file_token(path, metadata): {_first(): _vectors(content["emb_params"], "emb_params", path)}
            }
        params = content.get("string_to_param")
        if not isinstance(params, Mapping) or len(params) != 1:
            raise FormatError("A1111 embedding needs exactly one string_to_param entry", path=path)
        token = str(content.get("name") or _token_from_path(path))
        return {token: {_first(): _vectors(next(iter(params.values())), "string_to_param", path)}}
    if fmt == "sdxl-embedding":
        slots = _slots()
        unknown = set(content) - set(slots)
        if unknown:
            raise FormatError(f"unexpected keys in an SDXL embedding: {sorted(unknown)}", path=path)
        return {file_token(path, metadata): {slots[k]: _vectors(v, k, path) for k, v in content.items()}}
    if fmt == "diffusers-embedding":
        return {str(token): {_first(): _vectors(v, f"token {token!r}", path)} for token, v in content.items()}
    raise FormatError(f"not an embedding format: {fmt}", path=path)


def write(embeddings: Mapping[str, Mapping[str, torch.Tensor]], fmt: str) -> dict[str, torch.Tensor]:
    """``{token: {component: [n, dim]}}`` → the tensors of a safetensors embedding file of ``fmt``."""
    if not embeddings:
        raise FormatError("no token embeddings to write")
    if fmt == "diffusers-embedding":
        out = {}
        for token, per in embeddings.items():
            if set(per) != {_first()}:
                raise FormatError(
                    f"token {token!r} has vectors for {sorted(per)}; the diffusers format holds the first "
                    "text encoder only (use sdxl-embedding)"
                )
            t = per[_first()]
            out[token] = (t[0] if t.shape[0] == 1 else t).contiguous()
        return out
    if len(embeddings) != 1:
        raise FormatError(f"{fmt} holds one token, got {len(embeddings)}: {sorted(embeddings)}")
    ((token, per),) = embeddings.items()
    if fmt == "sdxl-embedding":
        names = {v: k for k, v in _slots().items()}
        return {names[c]: t.contiguous() for c, t in per.items() if c in names}
    if fmt == "a1111-embedding":
        if set(per) != {_first()}:
            raise FormatError(f"the A1111 format holds one text encoder; token {token!r} has {sorted(per)}")
        return {"emb_params": per[_first()].contiguous()}
    raise FormatError(f"not an embedding format: {fmt}")


def save(
    embeddings: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | Path,
    *,
    format: str | None = None,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write embeddings atomically. ``format`` defaults: ``.pt`` → A1111 pickle; two text encoders → SDXL;
    otherwise diffusers ``{token: vectors}`` safetensors."""
    import torch

    from lorax import __version__
    from lorax.io.atomic import atomic_path
    from lorax.io.safetensors_io import save_tensors

    out = Path(path)
    if format is None:
        if out.suffix == ".pt":
            format = "a1111-embedding"
        elif any(set(per) - {_first()} for per in embeddings.values()):
            format = "sdxl-embedding"
        else:
            format = "diffusers-embedding"
    header = {"lorax_version": __version__, "lorax_format": format, **dict(metadata or {})}
    with atomic_path(out, force) as tmp:
        if out.suffix == ".pt":
            if format != "a1111-embedding":
                raise FormatError(f"{format} files are .safetensors", path=out)
            tensors = write(embeddings, format)
            token = next(iter(embeddings))
            doc = {
                "string_to_token": {"*": 265},
                "string_to_param": {"*": tensors["emb_params"]},
                "name": token,
                "step": 0,
            }
            torch.save(doc, tmp)
        else:
            save_tensors(write(embeddings, format), tmp, header)
    return out
