"""The diffusion core's own error, so the core imports nothing of the app.

`DiffusionSettingError` is a setting the maths or the network cannot work with (an unknown schedule,
a respacing that does not fit T, a strength outside [0, 1], attention at a resolution the U-Net
never reaches…). It is a `ValueError`; the console scripts print it as one `error: …` line.
"""

from __future__ import annotations


class DiffusionSettingError(ValueError):
    """A diffusion or U-Net setting that cannot work; the message names it and the valid choices."""
