"""Training machinery shared by train, invert and pivot: config, PEFT LoRA injection, the diffusion objective,
optimizers, checkpoints and the loop."""

from lorax.training import pivot_config  # noqa: F401  (defines and registers the invert and pivot configs)
