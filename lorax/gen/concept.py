"""A LoRA built in closed form that makes one prompt behave like another (a cross-attention concept edit).

For every cross-attention key and value projection ``W`` of the UNet, the edit ``ΔW`` maps the text states of the
``source`` prompt onto the keys and values the ``target`` prompt would produce: it solves, with a small ridge term,

    min ‖(W + ΔW) Hₛᵀ − W Hₜᵀ‖² + λ‖ΔW‖²   ⇒   ΔW = W (Hₜ − Hₛ)ᵀ Hₛ (HₛᵀHₛ + λI)⁻¹

(the closed form of Orgad et al., "Editing Implicit Assumptions in Text-to-Image Diffusion Models", 2023), stored as
a LoRA by its SVD. At scale 0 the model is untouched; at scale 1 "a blue circle" draws what "a red circle" would.
lorax uses it for tests and pictures where a LoRA with a known, measurable concept is needed without training.

    python -m lorax.gen.concept shapes "a blue circle on a white background" "a red circle on a white background" \\
        -o blue-to-red.safetensors
"""

from __future__ import annotations

import argparse
from typing import Any

from lorax.adapters.state import DeltaModule, LoraModule, LoraState


def _text_states(pipe: Any, prompt: str) -> Any:
    import torch

    ids = pipe.tokenizer(
        [prompt],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0].double().cpu()


def concept_edit_lora(
    pipe: Any,
    source: str,
    target: str,
    *,
    rank: int | None = None,
    ridge: float = 1e-2,
    family: str | None = None,
) -> LoraState:
    """A LoRA on every ``attn2.to_k`` / ``attn2.to_v`` that turns ``source`` into ``target`` (see the module doc).

    ``rank`` truncates each delta's SVD (default: its full rank); ``ridge`` is λ relative to the mean squared norm
    of the source's text states.
    """
    import torch

    from lorax.adapters.apply import pipeline_family

    hs, ht = _text_states(pipe, source), _text_states(pipe, target)
    gram = hs.T @ hs
    lam = ridge * float(torch.diagonal(gram).mean())
    solve = hs @ torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))  # [T, d]
    modules: dict[str, LoraModule | DeltaModule] = {}
    for name, module in pipe.unet.named_modules():
        if not name.endswith(("attn2.to_k", "attn2.to_v")):
            continue
        weight = module.weight.detach().double().cpu()
        delta = weight @ (ht - hs).T @ solve  # [out, d]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = int((s > s[0] * 1e-6).sum()) if rank is None else min(rank, int(s.numel()))
        keep = max(1, keep)
        modules[f"unet.{name}"] = LoraModule(
            down=vh[:keep].float().contiguous(),
            up=(u[:, :keep] * s[:keep]).float().contiguous(),
            alpha=float(keep),
        )
    metadata = {"lorax_concept_source": source, "lorax_concept_target": target}
    return LoraState(modules, metadata=metadata, family=family or pipeline_family(pipe))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorax.gen.concept", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="built-in name, diffusers folder or single file")
    parser.add_argument("source", help="the prompt to change")
    parser.add_argument("target", help="the prompt it should behave like")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    from lorax.adapters.apply import quiet_libraries
    from lorax.formats import save_lora
    from lorax.gen.runtime import load_model

    with quiet_libraries():
        pipe = load_model(args.model)
    state = concept_edit_lora(pipe, args.source, args.target, rank=args.rank)
    print(save_lora(state, args.output, format="kohya", force=args.force, metadata=state.metadata))


if __name__ == "__main__":
    main()
