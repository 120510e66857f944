"""iris-diffusion's application layer and everything under it.

Layers, imports pointing down only: `cli` → app (`generate`, `demo`, `serve`, `report`) → (`check`,
`data`, `vae`, `guided_diffusion`) → `common`. `tests/test_layering.py` enforces it."""
