"""Learned tokens in a tokenizer: the names of a multi-vector token and the one rule for a name that is taken.

Every place that adds tokens (``invert``/``pivot`` training, loading an embedding for ``generate``, merging tokens
into a model folder) names vectors and refuses clashes here, so they agree; a text encoder that gained tokens pools
at its real end-of-text token (``pool_at_eos``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def vector_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of an ``n``-vector token: ``tok``, ``tok_1``, … (diffusers' multi-vector convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def existing_id(tokenizer: Any, name: str) -> int | None:
    """The row of ``name`` if the tokenizer already has it: an entry of its vocabulary, or a word it encodes as
    exactly one token (CLIP's vocabulary spells whole words ``sks</w>``)."""
    vocab = tokenizer.get_vocab()
    if name in vocab:
        return int(vocab[name])
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
        return int(ids[0])
    return None


def taken(tokenizer: Any, names: Iterable[str]) -> list[str]:
    """The ``names`` the tokenizer already has a row for (``existing_id``), in order: a new token must not be one."""
    return [n for n in names if existing_id(tokenizer, n) is not None]


def pool_at_eos(text_encoder: Any, tokenizer: Any) -> None:
    """Make ``text_encoder`` pool at ``tokenizer``'s end-of-text token, whatever ids were added after it.

    transformers' CLIP text model pools at ``argmax(input_ids)`` when its config says ``eos_token_id: 2`` (the
    original CLIP and SDXL configs; correct only while EOS is the highest id), else at the first ``eos_token_id``
    (transformers PR #24773). With added tokens (ids above EOS) the argmax would pool at a placeholder: SDXL's
    ``text_embeds`` conditioning would change, unlike A1111/ComfyUI, which pool at the real EOS. Setting the
    tokenizer's EOS id makes both rules agree for every prompt without added tokens.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return
    models = [text_encoder, getattr(text_encoder, "text_model", None)]
    for model in models:
        if model is not None and "eos_token_id" in vars(model) and model.eos_token_id != eos:
            model.eos_token_id = int(eos)
    config = getattr(text_encoder, "config", None)
    if config is not None and getattr(config, "eos_token_id", None) != eos:
        config.eos_token_id = int(eos)
