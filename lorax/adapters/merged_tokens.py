"""Learned tokens in a merged model: added to a diffusers folder's tokenizer(s) and text encoder(s), or written as
A1111 embedding files beside a single file (which cannot hold new tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.errors import FormatError, MismatchError
from lorax.io.checkpoint_sources import SafetensorsSource, all_weight_files
from lorax.io.rewrite import rewrite_tensor_file
from lorax.progress import Progress

if TYPE_CHECKING:
    import torch


def add_embeddings_to_folder(
    folder: Path, embeddings: dict[str, dict[str, torch.Tensor]], progress: Progress
) -> list[str]:
    """Add tokens to a diffusers folder's tokenizer(s) and text encoder(s) (multi-vector: ``tok``, ``tok_1`` …)."""
    import torch
    from transformers import CLIPTokenizer

    added: list[str] = []
    from lorax.models import families
    from lorax.models.tokens import taken, vector_names

    text = {
        (c.name, c.tokenizer or ""): None
        for f in families.all_families()
        for c in f.components
        if c.tokenizer
    }
    for component, tok_dir in text:
        wanted = {t: e[component] for t, e in embeddings.items() if component in e}
        if not wanted:
            continue
        if not (folder / tok_dir).is_dir() or not (folder / component).is_dir():
            raise MismatchError(f"the embeddings are for {component}, which the model does not have")
        tokenizer = CLIPTokenizer.from_pretrained(folder / tok_dir)
        files = all_weight_files(folder / component)
        names_by_token = {t: vector_names(t, e.reshape(-1, e.shape[-1]).shape[0]) for t, e in wanted.items()}
        clash = taken(tokenizer, [n for names in names_by_token.values() for n in names])
        if clash:
            raise MismatchError(
                f"token {clash[0]} is already in the model's {tok_dir}; rename the token in the LoRA "
                "rather than overwrite a token the model knows"
            )
        tokenizer.add_tokens([n for names in names_by_token.values() for n in names])
        for f in files:
            src = SafetensorsSource([f])
            key = next((k for k in src if k.endswith("embeddings.token_embedding.weight")), None)
            if key is None:
                raise FormatError("the text encoder has no token embedding", path=f)
            table = src.get(key).clone()
            need = len(tokenizer)
            if table.shape[0] < need:
                table = torch.cat([table, table.new_zeros(need - table.shape[0], table.shape[1])])
            for token, emb in wanted.items():
                vectors = emb.reshape(-1, emb.shape[-1])
                if vectors.shape[1] != table.shape[1]:
                    raise MismatchError(
                        f"token {token}: embedding width {vectors.shape[1]} does not fit {component} "
                        f"(width {table.shape[1]})"
                    )
                ids = tokenizer.convert_tokens_to_ids(names_by_token[token])
                table[ids] = vectors.to(table.dtype)
            tmp = f.with_name(f.name + ".tmp")
            rewrite_tensor_file(
                src, tmp, metadata=src.metadata or {"format": "pt"}, replacements={key: table}
            )
            tmp.replace(f)
        cfg_path = folder / component / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_size"] = len(tokenizer)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(folder / tok_dir)
        tokenizer.save_pretrained(folder / tok_dir)
        added += [t for t in wanted if t not in added]
    progress.log(f"added tokens {', '.join(added)} to the output's tokenizer and text encoder")
    return added


def write_embeddings_beside(
    out: Path, embeddings: dict[str, dict[str, torch.Tensor]], family: str, force: bool, progress: Progress
) -> list[str]:
    """A1111 embedding files next to a single-file output (A1111 uses the file name as the prompt word)."""
    from lorax.formats import save_embeddings
    from lorax.models import families

    written = []
    for token, comps in embeddings.items():
        word = "".join(ch for ch in token if ch.isalnum() or ch in "-_") or "token"
        path = out.parent / f"{out.stem}.{word}.safetensors"
        found = families.find(family)
        fmt = found.embedding_format if found else "a1111-embedding"
        save_embeddings({token: comps}, path, format=fmt, force=force)
        progress.log(
            f"token {token}: a single file cannot hold new tokens; wrote an A1111 embedding to {path} "
            f"(copy it to the embeddings folder and write {path.stem} in prompts)"
        )
        written.append(str(path))
    return written
