"""Stage 1: a Keras 3 VAE that learns the coarse shape of an eye and samples shape-correct priors.

Keras runs on its torch backend unless `KERAS_BACKEND` names another (it must be set before Keras is
first imported, which importing this package does not do): on this project's CPUs it trains the VAE
faster than TensorFlow (`benchmarks/bench_vae.py`), and the pipeline then needs a single framework,
PyTorch, on one GPU memory pool. `KERAS_BACKEND=tensorflow` still works (`pip install tensorflow`);
for it, importing this package switches on TensorFlow GPU memory growth (before any TensorFlow op),
so TensorFlow and PyTorch can share one GPU in the same process. A `.keras` file trained under one
backend loads under the other. Heavy modules (Keras) are imported only by the submodules that need them.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from vae.gpu import enable_tf_memory_growth  # noqa: E402

enable_tf_memory_growth()
