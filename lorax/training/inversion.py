"""Textual inversion: new tokens in the tokenizer, their rows in the text encoder's input embeddings, and the rules
that keep every other row untouched.

``LearnedTokens.add`` registers placeholder tokens (``<s1>``; with ``n`` vectors ``<s1> <s1>_1 … <s1>_{n-1}``, the
multi-vector convention diffusers' pipelines and ``lorax generate`` expand in prompts) and initialises their rows:
from a word of any length (the mean of its tokens' embeddings; a word of exactly one token per vector starts each
vector from its own token, so ``"red blue"`` with two vectors starts as red, blue), ``rand`` / ``<rand-σ>`` (normal noise, σ 0.017 by
default, the seed's ``lora_pti``), or ``zero`` / ``<zero>``. During training a gradient hook zeroes the gradient of
every other row and ``after_step`` copies the original rows back, bit for bit; with norm decay the new rows' norms
are pulled toward ``target`` by ``λ = min(1, 100·lr)`` per step (the seed's ``clip_ti_decay``).

SDXL learns the same tokens in both text encoders (``text_encoder`` = CLIP ViT-L, "clip_l"; ``text_encoder_2`` =
OpenCLIP bigG, "clip_g"): ``LearnedTokenSet`` holds one ``LearnedTokens`` per encoder behind the same interface, and
``learn_tokens(pipe, family, …)`` picks the one a model needs. The second table's norm-decay target is
``target × mean‖row‖₂ / mean‖row‖₁`` over the two tables' original rows: the seed's 0.4 is about the mean norm of
CLIP ViT-L's token embeddings, so each table is pulled toward its own typical word norm, in the same proportion.

Adding tokens also moves the text encoders' pooling to the tokenizer's real end-of-text id (``pool_at_eos``): CLIP
configs with ``eos_token_id: 2`` pool at ``argmax(input_ids)``, which a new (higher) id would capture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorax.errors import InputError
from lorax.models.tokens import existing_id, pool_at_eos, vector_names
from lorax.training.token_specs import init_vectors

NORM_TARGET = 0.4  # the seed's clip_ti_decay target norm
STATE_PREFIX = (
    "embeddings."  # checkpoint keys of the first text encoder's rows (SD1/SD2 checkpoints: the only ones)
)
STATE_PREFIX_2 = "embeddings_2."  # SDXL: the second text encoder's rows


@dataclass
class LearnedTokens:
    """The placeholder tokens of a run and the embedding rows they own.

    ``rows[token]`` are the row indices (one per vector). ``original`` is a copy of the whole table taken when the
    tokens were added; ``restore()`` puts every row that is not a learned row back from it, exactly.
    """

    tokenizer: Any
    text_encoder: Any
    rows: dict[str, list[int]]
    original: Any
    frozen: Any  # bool [vocab]: rows to keep
    norm_target: float = NORM_TARGET
    component: str = "text_encoder"  # the key of these rows in ``embeddings()`` (``LoraState.embeddings``)
    prefix: str = STATE_PREFIX  # of the checkpoint keys in ``state_tensors()``
    _hook: Any = field(default=None, repr=False)

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def add(
        cls,
        tokenizer: Any,
        text_encoder: Any,
        tokens: Sequence[str],
        *,
        vectors: int = 1,
        init: Sequence[str] | None = None,
        overwrite: bool = False,
        seed: int = 0,
        norm_target: float = NORM_TARGET,
        component: str = "text_encoder",
        prefix: str = STATE_PREFIX,
        stream: int = 0,
    ) -> LearnedTokens:
        """Register ``tokens`` (``vectors`` rows each) and initialise their rows.

        ``component`` / ``prefix`` name the rows in ``embeddings()`` and checkpoints; ``stream`` separates the random
        initialisers of several encoders learning the same tokens (0: the first encoder's, as SD1/SD2 always had).

        Raises:
            InputError: a token already in the vocabulary (without ``overwrite``), or an init word the tokenizer
                cannot encode.
        """
        import torch

        init = list(init) if init is not None else ["rand"] * len(tokens)
        names = {t: vector_names(t, vectors) for t in tokens}
        existing = {n: existing_id(tokenizer, n) for t in tokens for n in names[t]}
        clash = [n for n, i in existing.items() if i is not None]
        if clash and not overwrite:
            raise InputError(
                f"--token {clash[0]} is already in the model's vocabulary; choose another token "
                "(e.g. '<s1>') or pass --overwrite-token to train its row"
            )
        table = text_encoder.get_input_embeddings()
        # Init vectors are computed from the table before anything changes (an init word may share rows).
        starts = {
            t: init_vectors(
                spec, tokenizer, table.weight.detach(), vectors, tokens, seed=seed, index=i, stream=stream
            )
            for i, (t, spec) in enumerate(zip(tokens, init, strict=True))
        }
        new = [n for n, i in existing.items() if i is None]
        if new:
            tokenizer.add_tokens(new)
        needed = len(tokenizer)
        if needed > table.weight.shape[0]:
            text_encoder.resize_token_embeddings(needed, mean_resizing=False)
            table = text_encoder.get_input_embeddings()
        pool_at_eos(text_encoder, tokenizer)

        def row(name: str) -> int:
            known = existing[name]
            return int(known) if known is not None else int(tokenizer.convert_tokens_to_ids(name))

        rows = {t: [row(n) for n in names[t]] for t in tokens}
        with torch.no_grad():
            for t in tokens:
                table.weight[rows[t]] = starts[t].to(device=table.weight.device, dtype=table.weight.dtype)
        frozen = torch.ones(table.weight.shape[0], dtype=torch.bool)
        frozen[[r for t in tokens for r in rows[t]]] = False
        return cls(
            tokenizer,
            text_encoder,
            rows,
            table.weight.detach().clone(),
            frozen,
            norm_target=norm_target,
            component=component,
            prefix=prefix,
        )

    # ---------------------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return list(self.rows)

    @property
    def all_rows(self) -> list[int]:
        return [r for rows in self.rows.values() for r in rows]

    @property
    def weight(self) -> Any:
        return self.text_encoder.get_input_embeddings().weight

    def expand(self, caption: str) -> str:
        """``"a <s1> square"`` → ``"a <s1> <s1>_1 square"`` for multi-vector tokens (single vectors unchanged)."""
        for token, rows in self.rows.items():
            if len(rows) > 1 and token in caption:
                caption = caption.replace(token, " ".join(vector_names(token, len(rows))))
        return caption

    @property
    def mean_row_norm(self) -> float:
        """The mean L2 norm of the table's original (not learned) rows."""
        return float(self.original[self.frozen.to(self.original.device)].float().norm(dim=-1).mean())

    def parameters(self) -> list[Any]:
        """The parameters an optimizer updates: the embedding table."""
        return [self.weight]

    def make_trainable(self) -> list[Any]:
        """Let the embedding table train (fp32), with the gradient of every other row zeroed; returns
        ``parameters()``."""
        weight = self.weight
        weight.data = weight.data.float()
        weight.requires_grad_(True)
        if self._hook is None:
            keep = self.frozen.to(weight.device)

            def only_new_rows(grad: Any) -> Any:
                return grad.masked_fill(keep[:, None], 0.0)

            self._hook = weight.register_hook(only_new_rows)
        return [weight]

    def freeze(self) -> None:
        """Stop training the table (the rows keep their values)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.weight.requires_grad_(False)

    def restore(self) -> None:
        """Every row but the learned ones back to its original value, bit for bit."""
        import torch

        weight = self.weight
        with torch.no_grad():
            keep = self.frozen.to(weight.device)
            weight[keep] = self.original.to(weight.device, weight.dtype)[keep]

    def decay_norms(self, lr: float) -> None:
        """The seed's ``clip_ti_decay``: ``e ← normalize(e) · (n + λ (target − n))`` with ``λ = min(1, 100·lr)``."""
        import torch
        import torch.nn.functional as F

        lam = min(1.0, 100.0 * lr)
        weight = self.weight
        rows = self.all_rows
        with torch.no_grad():
            e = weight[rows].float()
            norm = e.norm(dim=-1, keepdim=True)
            weight[rows] = (F.normalize(e, dim=-1) * (norm + lam * (self.norm_target - norm))).to(
                weight.dtype
            )

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """``{token: {component: [n, dim]}}`` (fp32 CPU copies), as ``LoraState.embeddings`` holds them."""
        weight = self.weight.detach()
        return {t: {self.component: weight[rows].float().cpu().clone()} for t, rows in self.rows.items()}

    def state_tensors(self) -> dict[str, Any]:
        return {self.prefix + t: v[self.component] for t, v in self.embeddings().items()}

    def load_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        """Put back rows saved by ``state_tensors``; the checkpoint must hold exactly this run's tokens."""
        import torch

        from lorax.errors import MismatchError

        saved = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        if set(saved) != set(self.rows):
            raise MismatchError(
                f"the checkpoint learns tokens {sorted(saved)}, this run {sorted(self.rows)}: resume with the same --token"
            )
        weight = self.weight
        with torch.no_grad():
            for token, rows in self.rows.items():
                if tuple(saved[token].shape) != (len(rows), weight.shape[1]):
                    raise MismatchError(
                        f"the checkpoint's {token} has shape {tuple(saved[token].shape)}; resume with the same --vectors"
                    )
                weight[rows] = saved[token].to(weight.device, weight.dtype)

    def set_embeddings(self, embeddings: Mapping[str, Mapping[str, Any]]) -> None:
        """Put learned vectors (``{token: {component: [n, dim]}}``) into the rows."""
        self.load_state_tensors({self.prefix + t: v[self.component] for t, v in embeddings.items()})


def is_state_key(key: str) -> bool:
    """Whether a checkpoint tensor holds learned token rows (of either text encoder)."""
    return key.startswith((STATE_PREFIX, STATE_PREFIX_2))


@dataclass
class LearnedTokenSet:
    """The same placeholder tokens learned in several text encoders (SDXL: ``text_encoder`` and ``text_encoder_2``),
    one ``LearnedTokens`` each, behind ``LearnedTokens``' interface."""

    parts: dict[str, LearnedTokens]  # by component, the first text encoder first

    @classmethod
    def add(
        cls,
        encoders: Sequence[tuple[str, Any, Any]],
        tokens: Sequence[str],
        *,
        overwrite: bool = False,
        norm_target: float = NORM_TARGET,
        **options: Any,
    ) -> LearnedTokenSet:
        """Register ``tokens`` in each ``(component, tokenizer, text_encoder)`` (two at most); the first table sets
        ``norm_target``, the others scale it by their mean row norm over the first's (see the module's doc).
        ``options``: ``LearnedTokens.add``'s ``vectors``, ``init`` and ``seed``."""
        parts: dict[str, LearnedTokens] = {}
        first: LearnedTokens | None = None
        seen: list[Any] = []
        for i, (component, tokenizer, encoder) in enumerate(encoders):
            part = LearnedTokens.add(
                tokenizer,
                encoder,
                tokens,
                # a tokenizer shared with an earlier encoder already has the tokens: take their rows
                overwrite=overwrite or any(tokenizer is t for t in seen),
                norm_target=norm_target,
                component=component,
                prefix=(STATE_PREFIX, STATE_PREFIX_2)[i],
                stream=i,
                **options,
            )
            seen.append(tokenizer)
            if first is None:
                first = part
            else:
                part.norm_target = norm_target * part.mean_row_norm / first.mean_row_norm
            parts[component] = part
        return cls(parts)

    @property
    def first(self) -> LearnedTokens:
        return next(iter(self.parts.values()))

    @property
    def tokens(self) -> list[str]:
        return self.first.tokens

    @property
    def rows(self) -> dict[str, list[int]]:
        """The first encoder's rows (``parts[component].rows`` for the others)."""
        return self.first.rows

    def expand(self, caption: str) -> str:
        return self.first.expand(caption)

    def parameters(self) -> list[Any]:
        return [p for part in self.parts.values() for p in part.parameters()]

    def make_trainable(self) -> list[Any]:
        return [p for part in self.parts.values() for p in part.make_trainable()]

    def freeze(self) -> None:
        for part in self.parts.values():
            part.freeze()

    def restore(self) -> None:
        for part in self.parts.values():
            part.restore()

    def decay_norms(self, lr: float) -> None:
        for part in self.parts.values():
            part.decay_norms(lr)

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """``{token: {"text_encoder": [n, d1], "text_encoder_2": [n, d2]}}``."""
        out: dict[str, dict[str, Any]] = {t: {} for t in self.tokens}
        for part in self.parts.values():
            for token, per in part.embeddings().items():
                out[token].update(per)
        return out

    def state_tensors(self) -> dict[str, Any]:
        return {k: v for part in self.parts.values() for k, v in part.state_tensors().items()}

    def load_state_tensors(self, tensors: Mapping[str, Any]) -> None:
        from lorax.errors import MismatchError

        for part in self.parts.values():
            if not any(k.startswith(part.prefix) for k in tensors):
                raise MismatchError(
                    f"the checkpoint holds no {part.component} rows for the tokens: it was written for another model"
                )
            part.load_state_tensors(tensors)  # the prefixes are disjoint: each part takes its own keys

    def set_embeddings(self, embeddings: Mapping[str, Mapping[str, Any]]) -> None:
        for part in self.parts.values():
            part.set_embeddings(embeddings)


def learn_tokens(
    pipe: Any, family: str, tokens: Sequence[str], **options: Any
) -> LearnedTokens | LearnedTokenSet:
    """The tokens ``pipe`` learns: one table (SD1/SD2), or both of SDXL's text encoders (``LearnedTokenSet``).
    ``options``: those of ``LearnedTokens.add``."""
    from lorax.models import families

    text = [c for c in families.get(family).components if c.kind == "text"]
    if len(text) > 1:
        return LearnedTokenSet.add(
            [(c.name, getattr(pipe, c.tokenizer or ""), getattr(pipe, c.name)) for c in text],
            tokens,
            **options,
        )
    return LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, tokens, **options)
