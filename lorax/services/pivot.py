"""``lorax pivot``: pivotal tuning — textual inversion first, then a LoRA trained around the learned tokens.

Phase 1 is ``lorax invert``'s recipe (``lorax.training.inversion_recipe``): only the new rows train, ``--ti-steps``
steps at ``--ti-learning-rate``. Phase 2 is ``PivotRecipe`` (``lorax.training.pivot_recipe``), ``lorax train``'s
``LoraRecipe`` (UNet LoRA, the text encoder's with ``--train-text``, prior preservation, caches, validation) over the
same data, with the tokens frozen, or trained on at a small learning rate with ``--continue-inversion``; loss masks
apply in both phases. Steps count on
across the phases (phase 2's first step is ``ti_steps + 1``), so one folder of checkpoints and one loss curve cover
the run, and ``--resume`` picks the phase from the checkpoint.

The output is one file holding the LoRA and the tokens: kohya with the embeddings bundled
(``bundle_emb.<token>.string_to_param.*``, loaded by A1111/ComfyUI and ``lorax generate --lora``), or the seed's own
``lora_diffusion`` format. On SDXL the tokens live in both text encoders (``bundle_emb.<token>.clip_l`` / ``.clip_g``,
``lora_te1_`` / ``lora_te2_`` with ``--train-text``); ``lora_diffusion`` has no SDXL layout and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError
from lorax.progress import NullProgress, Progress
from lorax.training.inversion_recipe import InversionRecipe, prepare, token_info
from lorax.training.outputs import LoraRunReport, finish_run, start_run
from lorax.training.pivot_config import PivotConfig
from lorax.training.pivot_recipe import PivotRecipe
from lorax.training.recipe import check_within, load_resume, total_steps


@dataclass
class _PivotHead:
    output: Path
    format: str
    tokens: list[str]
    ti_steps: int
    steps: int  # LoRA steps (phase 2)


@dataclass
class PivotResult(LoraRunReport, _PivotHead):  # JSON order: _PivotHead's fields, LoraRunReport's, these
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )


def pivot(config: PivotConfig, progress: Progress | None = None, *, pipeline: Any = None) -> PivotResult:
    """Pivotal tuning as ``config`` says; returns where everything went and what it measured."""
    progress = progress or NullProgress()
    output = start_run(config)
    resume = load_resume(config)
    phase = resume.info.get("phase") if resume is not None else None
    session = prepare(config, progress, pipeline)
    info = token_info(session)
    ti_steps = config.ti_steps
    lora_steps = total_steps(config, session.data.batches_per_epoch())
    if resume is not None and resume.info.get("ti_steps", ti_steps) != ti_steps:
        raise ConfigError(
            f"--resume: the checkpoint's run has --ti-steps {resume.info['ti_steps']}; resume with the same value"
        )
    info["ti_steps"] = ti_steps

    resumed = (resume.path, resume.state.global_step) if resume is not None else None
    # Phase 1: textual inversion (skipped when resuming inside phase 2).
    state = None
    checkpoints: list[Path] = []
    samples: list[Path] = []
    if phase != "tuning":
        loop = InversionRecipe(session, {**info, "phase": "inversion"}).setup(ti_steps, progress)
        if resume is not None:
            loop.restore(resume)
            progress.log(f"resuming inversion from {resume.path} at step {loop.state.global_step}")
        if ti_steps > 0:
            result = loop.run()
            checkpoints += result.checkpoints
            samples += result.samples
            every = config.checkpoint_every
            if every and ti_steps % every == 0 and result.steps_this_run:  # the loop skips its last step
                saved = loop.save()
                if saved is not None:
                    checkpoints.append(saved)
                    progress.log(f"checkpoint: {saved}")
        state = loop.state
    session.tokens.freeze()

    # Phase 2: LoRA around the learned tokens.
    recipe = PivotRecipe.of(session, info)
    loop2 = recipe.setup(lora_steps, progress)
    if state is not None:
        loop2.state = state
    else:
        assert resume is not None
        loop2.restore(resume)
        progress.log(f"resuming tuning from {resume.path} at step {loop2.state.global_step}")
    check_within(loop2.state.global_step, ti_steps + lora_steps)
    result2 = loop2.run()
    checkpoints += result2.checkpoints
    samples += result2.samples

    def save() -> None:
        recipe.save(loop2, output, ti_steps=ti_steps)

    run = finish_run(config, loop2, save, resumed=resumed, checkpoints=checkpoints, samples=samples)
    return PivotResult(
        output=output,
        format=config.format,
        tokens=session.tokens.tokens,
        ti_steps=ti_steps,
        steps=loop2.state.global_step - ti_steps,
        **run,
        num_images=len(session.items),
        num_class_images=len(session.class_items),
        base_model_bytes=session.base_bytes,
        modules=recipe.modules,
    )
