"""``lorax invert``: textual inversion — learn new token embeddings, nothing else.

``invert(config, progress)`` orchestrates ``InversionRecipe`` (``lorax.training.inversion_recipe``): it plans the
outputs, prepares the session (images with the token substituted in their captions, or templates; the model; the
placeholder tokens), sets the recipe up (only the new rows train through the shared ``TrainingLoop``: checkpoints,
exact resume, validation images, progress, NaN/OOM stops), resumes, runs it, and writes an A1111 (``.pt``
``string_to_param`` / ``.safetensors`` ``emb_params``) or diffusers (``learned_embeds``) embedding, with the loss curve
and resolved config beside it. On SDXL the tokens train in both text encoders and the output is an SDXL embedding
(``.safetensors`` with ``clip_l`` / ``clip_g``). ``lorax pivot`` runs the same recipe as its first phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.progress import NullProgress, Progress
from lorax.training.inversion_recipe import InversionRecipe, norms, prepare, token_info
from lorax.training.outputs import finish_run, start_run
from lorax.training.pivot_config import InvertConfig
from lorax.training.recipe import check_within, load_resume, total_steps


@dataclass
class InvertResult:
    output: Path
    format: str
    tokens: list[str]
    vectors: int
    steps: int
    final_loss: float | None
    seconds: float
    num_images: int
    loss_csv: Path
    loss_png: Path
    config_path: Path
    file_bytes: int
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    norms: dict[str, list[float]] = field(default_factory=dict)  # learned vectors' norms per token
    norms_2: dict[str, list[float]] = field(default_factory=dict)  # SDXL: the same in text_encoder_2 (clip_g)
    losses: list[list[float]] = field(default_factory=list)
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )


def invert(config: InvertConfig, progress: Progress | None = None, *, pipeline: Any = None) -> InvertResult:
    """Learn ``config.token``'s embedding(s) from ``config.data_dir``; returns where everything went.

    ``pipeline``: an already loaded ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) instead of
    ``config.model`` (tests, benchmarks).
    """
    progress = progress or NullProgress()
    output = start_run(config)
    resume = load_resume(config)
    session = prepare(config, progress, pipeline)
    max_steps = total_steps(config, session.data.batches_per_epoch())
    recipe = InversionRecipe(session, {**token_info(session), "phase": "inversion"})
    loop = recipe.setup(max_steps, progress)
    if resume is not None:
        loop.restore(resume)
        check_within(loop.state.global_step, max_steps)
        progress.log(f"resuming from {resume.path} at step {loop.state.global_step}")
    resumed = (resume.path, loop.state.global_step) if resume is not None else None
    loop.run()
    embeddings = session.tokens.embeddings()
    run = finish_run(config, loop, lambda: recipe.save(loop, output, progress=progress), resumed=resumed)
    return InvertResult(
        output=output,
        format=recipe.format,  # the file's format: a1111-embedding, diffusers-embedding or sdxl-embedding
        tokens=session.tokens.tokens,
        vectors=config.vectors,
        steps=loop.state.global_step,
        **run,
        num_images=len(session.items),
        norms=norms(embeddings),
        norms_2=norms(embeddings, "text_encoder_2"),
    )
