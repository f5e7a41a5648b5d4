"""The grammar of the token flags of ``lorax invert`` and ``lorax pivot`` (``--token``, ``--init-token``,
``--token-at-data``) and the start vectors an ``--init-token`` spec gives a new token (``init_vectors``: a word's
embedding, ``rand`` / ``<rand-σ>`` noise or ``zero``); ``lorax.training.inversion`` registers and trains the tokens."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lorax.errors import ConfigError, InputError

DEFAULT_SIGMA = 0.017  # the seed's initializer noise
_RAND = re.compile(r"^<?rand(?:-(?P<sigma>[0-9.eE+-]+))?>?$")
_ZERO = re.compile(r"^<?zero>?$")


def parse_tokens(spec: str) -> list[str]:
    """``"<s1>|<s2>"`` → ``["<s1>", "<s2>"]`` (the seed's ``placeholder_tokens``; order kept, duplicates refused)."""
    tokens = [t.strip() for t in spec.split("|")]
    if not all(tokens):
        raise ConfigError(f"--token {spec!r}: empty token name (separate several with |, e.g. '<s1>|<s2>')")
    bad = [t for t in tokens if any(c.isspace() for c in t)]
    if bad:
        raise ConfigError(f"--token {bad[0]!r}: a token cannot contain spaces")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"--token {spec!r}: a token is named twice")
    return tokens


def parse_init(spec: str | None, tokens: Sequence[str]) -> list[str]:
    """One initializer per token: ``None`` → random; one value for all; or ``|``-separated, one per token."""
    if spec is None:
        return ["rand"] * len(tokens)
    parts = [p.strip() for p in spec.split("|")] if "|" in spec else [spec.strip()]
    if len(parts) == 1:
        return parts * len(tokens)
    if len(parts) != len(tokens):
        raise ConfigError(
            f"--init-token {spec!r} names {len(parts)} initializers for {len(tokens)} tokens: give one, or one per token"
        )
    return parts


def parse_replacements(spec: str | None, tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``--token-at-data "purple|<s1>"`` (the seed's ``placeholder_token_at_data``): caption literal → token(s)."""
    if spec is None:
        return []
    pairs: list[tuple[str, str]] = []
    for part in spec.split(","):
        literal, sep, replacement = part.partition("|")
        if not sep or not literal.strip() or not replacement.strip():
            raise ConfigError(
                f"--token-at-data {part!r}: write LITERAL|TOKENS, e.g. 'purple|<s1>' (several: comma-separated)"
            )
        unknown = [t for t in re.findall(r"<[^<>\s]+>", replacement) if t not in tokens]
        if unknown:
            raise ConfigError(
                f"--token-at-data: {unknown[0]} is not one of the --token names ({'|'.join(tokens)})"
            )
        pairs.append((literal.strip(), replacement.strip()))
    return pairs


def replace_in_caption(caption: str, replacements: Sequence[tuple[str, str]]) -> str:
    for literal, replacement in replacements:
        caption = caption.replace(literal, replacement)
    return caption


def init_vectors(
    spec: str,
    tokenizer: Any,
    weight: Any,
    n: int,
    placeholders: Sequence[str],
    *,
    seed: int,
    index: int,
    stream: int = 0,
) -> Any:
    """``[n, dim]`` start vectors for one token."""
    import torch

    dim = weight.shape[1]
    spec = spec.strip()
    rand = _RAND.match(spec)
    if rand:
        try:
            sigma = float(rand.group("sigma")) if rand.group("sigma") else DEFAULT_SIGMA
        except ValueError:
            raise InputError(f"--init-token {spec!r}: write rand, or <rand-σ> with a number σ") from None
        generator = torch.Generator().manual_seed(seed * 1009 + index + stream * 7919)
        return torch.randn((n, dim), generator=generator) * sigma
    if _ZERO.match(spec):
        return torch.zeros((n, dim))
    if any(p in spec for p in placeholders):
        raise InputError(
            f"--init-token {spec!r} uses a token being learned; start from a word the model knows"
        )
    ids = tokenizer(spec, add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []))
    if not ids or (unk is not None and unk in ids) or any(i in special for i in ids):
        raise InputError(
            f"--init-token {spec!r}: the tokenizer cannot encode it into word tokens; use a plain word, rand or zero"
        )
    if max(ids) >= weight.shape[0]:
        raise InputError(f"--init-token {spec!r}: its tokens lie outside the text encoder's embedding table")
    if n > 1 and len(ids) == n:  # one word token per vector: "red blue" with --vectors 2 starts as red, blue
        return weight[ids].float().clone()
    mean = weight[ids].float().mean(dim=0)
    return mean.expand(n, dim).clone()
