"""Training machinery shared by train, invert and pivot: config, PEFT LoRA injection, the diffusion objective,
optimizers, checkpoints and the loop."""
