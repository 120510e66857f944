"""Let TensorFlow and PyTorch share one GPU: TensorFlow allocates GPU memory on demand.

By default TensorFlow reserves almost all GPU memory when it first touches a GPU, leaving none for
PyTorch in the same process. Memory growth must be switched on before that first touch.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def enable_tf_memory_growth() -> None:
    """Switch on TensorFlow GPU memory growth; a no-op without TensorFlow or GPUs.

    Sets `TF_FORCE_GPU_ALLOW_GROWTH` (read when TensorFlow initialises its GPUs, so importing
    TensorFlow is not needed here) and, if TensorFlow is already imported, also sets it through
    the API for every visible GPU.
    """
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # GPUs already initialised: too late to change
            log.warning("TensorFlow already initialised %s; memory growth could not be enabled", gpu.name)
