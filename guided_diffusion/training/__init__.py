"""Training the diffusion U-Net: loop, step, EMA, LR schedule, checkpoints, logs, health stats, DDP.

Uses the diffusion core and `pipeline.common`; the console script is `pipeline.cli.train_diffusion`."""
