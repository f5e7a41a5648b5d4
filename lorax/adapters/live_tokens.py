"""Learned tokens on a live pipeline: added to the tokenizer(s), their vectors to the text encoder(s)' input
embeddings (a token of ``n`` vectors becomes ``tok tok_1 … tok_{n-1}``, the convention diffusers' pipelines expand
in prompts), and prompts checked for ``<token>`` words no loaded embedding defines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.live import component as _component
from lorax.adapters.live import pipeline_family
from lorax.errors import MismatchError
from lorax.models.tokens import pool_at_eos, taken, vector_names


def _tokenizer_for(pipe: Any, component: str) -> Any:
    from lorax.models import families

    found = families.find(pipeline_family(pipe))
    spec = found.component(component) if found and found.has(component) else families.any_component(component)
    return getattr(pipe, spec.tokenizer, None) if spec and spec.tokenizer else None


def register_tokens(
    pipe: Any, embeddings: Mapping[str, Mapping[str, torch.Tensor]], *, source: str | Path | None = None
) -> list[str]:
    """Add learned tokens to the tokenizer(s) and their vectors to the text encoder(s); returns the tokens added.

    Raises:
        MismatchError: a token already in the vocabulary, vectors of the wrong width, or a component the model lacks.
    """
    added: list[str] = []
    for token, per_component in embeddings.items():
        for component, vectors in per_component.items():
            encoder = _component(pipe, component)
            tokenizer = _tokenizer_for(pipe, component)
            if encoder is None or tokenizer is None:
                raise MismatchError(
                    f"token {token} has vectors for {component}, which the model does not have", path=source
                )
            vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() != 2 else vectors
            table = encoder.get_input_embeddings()
            if vectors.shape[1] != table.weight.shape[1]:
                raise MismatchError(
                    f"token {token} has {vectors.shape[1]}-wide vectors; the model's {component} uses "
                    f"{table.weight.shape[1]}: the embedding is for another model",
                    path=source,
                )
            names = vector_names(token, vectors.shape[0])
            clash = taken(tokenizer, names)
            if clash:
                raise MismatchError(
                    f"token {clash[0]} is already in the model's vocabulary; rename the token", path=source
                )
            tokenizer.add_tokens(names)
            ids = tokenizer.convert_tokens_to_ids(names)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            pool_at_eos(encoder, tokenizer)  # pooled output (SDXL's text_embeds) at EOS, not at new ids
            table = encoder.get_input_embeddings()
            with torch.no_grad():
                for row, vector in zip(ids, vectors, strict=True):
                    table.weight[row] = vector.to(table.weight.dtype)
        added.append(token)
    return added


_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


def check_prompt_tokens(pipe: Any, prompts: Iterable[str]) -> None:
    """A ``<token>`` in a prompt that no loaded embedding defines is an error, not a silent string of letters."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    known = {t for t in vocab if _PLACEHOLDER.fullmatch(t)}
    for prompt in prompts:
        for token in _PLACEHOLDER.findall(prompt):
            if token not in vocab and token not in ("<|startoftext|>", "<|endoftext|>"):
                have = ", ".join(sorted(known - {"<|startoftext|>", "<|endoftext|>"})) or "none"
                raise MismatchError(
                    f"the prompt uses {token}, which no --embedding or --lora file defines (learned tokens: {have})"
                )
