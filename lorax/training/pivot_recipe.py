"""``PivotRecipe``: ``lorax pivot``'s second phase, a LoRA trained around the tokens its first phase
(``InversionRecipe``) learned.

It is ``LoraRecipe`` with three hooks overridden: ``make_job`` (the batches expand the tokens and carry pivot's loss
masks; ``PivotJob`` checkpoints the tokens with the LoRA and, with ``--continue-inversion``, trains them at their own
learning rate), ``setup`` (the tokens' parameter group on the same schedule, steps counted on from phase 1) and
``save`` (one file: the LoRA with the embeddings bundled, kohya's ``bundle_emb`` or ``lora_diffusion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.progress import Progress
from lorax.training.inversion_recipe import Session, inversion_metadata, make_batches
from lorax.training.job import LoraJob
from lorax.training.lora_recipe import LoraRecipe
from lorax.training.pivot_config import PivotConfig


class PivotJob(LoraJob):
    """``LoraJob`` (``job``: its arguments) plus the learned tokens: checkpointed with the LoRA, trained on with ``--continue-inversion``.

    ``text_encoders``: the encoders whose tables hold the tokens (SDXL: both), in training mode while the tokens train.
    """

    def __init__(
        self, batches: Any, tokens: Any, *, continue_inversion: bool, text_encoders: list[Any], **job: Any
    ) -> None:
        super().__init__(batches, **job)
        self.tokens = tokens
        self.continue_inversion = continue_inversion
        self.prompt_encoders = list(text_encoders)

    def trainable_models(self) -> list[Any]:
        models = super().trainable_models()
        if self.continue_inversion:
            unwrapped = [self.accelerator.unwrap_model(m) for m in models]
            models += [m for m in self.prompt_encoders if not any(m is u for u in unwrapped)]
        return models

    def parameters(self) -> list[Any]:
        params = super().parameters()
        return [*params, *self.tokens.parameters()] if self.continue_inversion else params

    def after_step(self, step: int) -> None:
        if self.continue_inversion:
            self.tokens.restore()

    def state_tensors(self) -> dict[str, Any]:
        return {**super().state_tensors(), **self.tokens.state_tensors()}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        from lorax.training.inversion import is_state_key

        self.tokens.load_state_tensors({k: v for k, v in tensors.items() if is_state_key(k)})
        super().load_state_tensors({k: v for k, v in tensors.items() if not is_state_key(k)})


@dataclass
class PivotRecipe(LoraRecipe):
    """``LoraRecipe`` on a phase-1 ``session`` (``of``); ``info`` goes into its checkpoints."""

    session: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, session: Session, info: dict[str, Any]) -> PivotRecipe:
        config = session.config
        assert isinstance(config, PivotConfig)
        # the tokens train on with --continue-inversion: their prompts are encoded afresh every step
        build_config = config.replace(cache_text=False) if config.continue_inversion else config
        return cls(
            build_config, session.pipe, session.data, session.accelerator, session.resolution, session.family,
            session=session, info=info,
        )  # fmt: skip

    @property
    def pivot_config(self) -> PivotConfig:
        config = self.session.config
        assert isinstance(config, PivotConfig)
        return config

    def setup(self, max_steps: int, progress: Progress) -> Any:
        """``LoraRecipe.setup`` for the ``max_steps`` LoRA steps, counted on from phase 1's ``--ti-steps``."""
        loop = super().setup(max_steps, progress)
        config = self.pivot_config
        if config.continue_inversion:
            params = self.session.tokens.make_trainable()
            _add_param_group(
                loop.optimizer, loop.scheduler, params, config.continue_lr, config.ti_weight_decay
            )
        loop.settings.max_steps = config.ti_steps + max_steps
        loop.settings.info = {**self.info, "phase": "tuning", "rank": config.rank, "targets": config.targets}
        loop.settings.description = "tuning"
        return loop

    def make_job(self, batches: Any, **models: Any) -> Any:
        from lorax.training import setup

        return PivotJob(
            make_batches(self.session, batches),
            self.session.tokens,
            continue_inversion=self.pivot_config.continue_inversion,
            text_encoders=setup.text_encoders(self.pipe, self.family),
            accelerator=self.accelerator,
            **models,
        )  # pivot has no --ema-decay: no EmaJob around it

    def lora_state(self) -> Any:
        state = super().lora_state()
        state.embeddings = self.session.tokens.embeddings()
        return state

    def save(self, loop: Any, path: Path, **options: Any) -> bool:
        """The LoRA and the tokens in one file at ``path``; ``options``: ``ti_steps``."""
        from lorax import dtypes
        from lorax.formats import save_lora
        from lorax.models.skeleton import skeleton

        session, config = self.session, self.pivot_config
        state = self.lora_state()
        metadata = self.metadata(
            _images_summary(session, config),
            session.class_items,
            session.started_at,
            items=session.items,
            config=config,
        )
        metadata.update(inversion_metadata(session, options["ti_steps"], loop.state.seconds))
        metadata["lorax_continue_inversion"] = str(config.continue_inversion)
        dtype = dtypes.torch_dtype(config.save_dtype)
        model = skeleton(session.pipe) if config.format == "lora_diffusion" else None
        save_lora(
            state, path, format=config.format, dtype=dtype, force=config.force, metadata=metadata, model=model
        )
        return True


def _add_param_group(
    optimizer: Any, scheduler: Any, params: list[Any], lr: float, weight_decay: float
) -> None:
    """Add the embedding table(s) to an optimizer whose LambdaLR schedule is already built (same schedule)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    factor = scheduler.lr_lambdas[0]
    inner.add_param_group(
        {
            "params": list(params),
            "lr": lr * factor(scheduler.last_epoch),
            "initial_lr": lr,
            "weight_decay": weight_decay,
        }
    )
    scheduler.base_lrs.append(lr)
    scheduler.lr_lambdas.append(factor)


def _images_summary(session: Any, config: PivotConfig) -> Any:
    """kohya's dataset keys for the pivot's image folder (its tokens are the trigger words)."""
    from lorax.data.training_images import DatasetSummary, TrainingImages

    summary = DatasetSummary()
    folder = Path(config.data_dir).name if config.data_dir is not None else "images"
    summary.add(folder, config.repeats, [it.caption for it in session.items])
    summary.trigger_words.extend(session.tokens.embeddings())
    return TrainingImages(list(session.items), list(session.class_items), summary)
