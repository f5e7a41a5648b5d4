"""The LoRAs of one ``lorax generate`` run, on the live pipeline: every ``--lora``, then an ``--xy lora`` axis's files.

All go on at once (:func:`put_on`); an X/Y cell switches the other cells' axis LoRAs to scale 0, which is exactly the
model without them, and :meth:`RunLoras.take_off` leaves a caller's pipeline as it was given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lorax.adapters.apply import AppliedLoras, LoraRequest, apply_loras
from lorax.adapters.state import LoraState
from lorax.gen.config import GenerateConfig, LoraSpec
from lorax.gen.plan import Job, xy_lora_specs


@dataclass
class RunSpecs:
    """``specs``: the ``--lora`` files, then the ``--xy lora`` axis's; ``axis_request[v]``: the index in ``specs`` of
    the axis's value ``v`` (None: the model alone)."""

    specs: list[LoraSpec]
    fixed: int  # how many of ``specs`` are --lora ones
    axis_request: list[int | None]

    @property
    def has_axis(self) -> bool:
        return bool(self.axis_request)


def run_specs(config: GenerateConfig) -> RunSpecs:
    """Every LoRA of the run, in the order they go on."""
    axis_specs = xy_lora_specs(config)
    axis_request: list[int | None] = []
    for spec in axis_specs:
        axis_request.append(
            None if spec is None else len(config.loras) + sum(i is not None for i in axis_request)
        )
    specs = [*config.loras, *[spec for spec in axis_specs if spec is not None]]
    return RunSpecs(specs, len(config.loras), axis_request)


@dataclass
class RunLoras:
    """The requests of a run and, once :func:`put_on`, the :class:`AppliedLoras` that hold them."""

    run: RunSpecs
    requests: list[LoraRequest]
    applied: AppliedLoras | None

    @property
    def names(self) -> list[str]:
        return self.applied.names if self.applied is not None else []

    def active(self, job: Job) -> list[int]:
        """The requests on for ``job``: every --lora, and of an --xy lora axis only the cell's own."""
        if job.lora is None:
            return list(range(len(self.requests)))
        chosen = self.run.axis_request[job.lora] if job.lora >= 0 else None
        return [*range(self.run.fixed), *([chosen] if chosen is not None else [])]

    def on_all(self) -> list[int]:
        """The run-wide LoRAs a sheet's own PNG info names (an --xy lora axis's files are in X/Y Values)."""
        return list(range(self.run.fixed if self.run.has_axis else len(self.requests)))

    def switch(self, job: Job) -> None:
        """With an --xy lora axis, the LoRAs of the other cells go to scale 0 (exactly the model without them)."""
        if self.applied is None or not self.run.has_axis:
            return
        on = set(self.active(job))
        for i, request in enumerate(self.requests):
            self.applied.requests[i] = (
                request if i in on else dataclasses.replace(request, unet_scale=0.0, text_scale=0.0)
            )

    def take_off(self) -> None:
        """Every LoRA off the pipeline: its weights are the base model's again."""
        if self.applied is not None:
            self.applied.requests[:] = self.requests
            self.applied.remove()


def put_on(pipe: Any, config: GenerateConfig, run: RunSpecs, states: list[LoraState]) -> RunLoras:
    """Apply every LoRA of the run at its requested scales (``--text-scale`` for those without their own)."""
    requests = [
        LoraRequest(
            state=state,
            name=spec.label,
            unet_scale=spec.scale,
            text_scale=spec.text_scale if spec.text_scale is not None else config.text_scale,
            blocks=config.blocks,
            source=spec.path,
        )
        for spec, state in zip(run.specs, states, strict=True)
    ]
    applied = apply_loras(pipe, requests, fuse=config.fuse) if requests else None
    return RunLoras(run, requests, applied)
