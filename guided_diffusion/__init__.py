"""Stage 2, PyTorch: the diffusion core (schedules, diffusion maths, respacing, samplers, U-Net) and,
in `training/`, the loop that trains it. The core imports nothing of `pipeline`; `training` may use
`pipeline.common` (config, files, images, errors)."""
