"""Stage 1: a Keras 3 VAE that learns the coarse shape of an eye and samples shape-correct priors.

Importing this package switches on TensorFlow GPU memory growth (before any TensorFlow op), so
TensorFlow and PyTorch can share one GPU in the same process. Heavy modules (Keras, TensorFlow)
are imported only by the submodules that need them.
"""

from vae.gpu import enable_tf_memory_growth

enable_tf_memory_growth()
