"""VAE loss terms as pure `keras.ops` functions (any backend).

Scaling: the reconstruction term is summed over pixels and channels per image and the KL term
summed over latent dimensions per image; both are then averaged over the batch. With β = 1 this
is the negative ELBO of a Gaussian decoder with variance 1/2 ("mse") or a Laplace decoder with
scale 1 ("l1"), up to constants; β < 1 asks for sharper reconstructions at the cost of a less
Gaussian aggregate posterior.
"""

from __future__ import annotations

from keras import ops

RECON_LOSSES = ("mse", "l1")


def reconstruction_loss(x, x_hat, kind: str = "mse"):
    """Per-image reconstruction error (B,): squared ("mse") or absolute ("l1") error summed over pixels."""
    diff = x - x_hat
    err = ops.square(diff) if kind == "mse" else ops.abs(diff)
    return ops.sum(ops.reshape(err, (ops.shape(err)[0], -1)), axis=-1)


def kl_per_dim(mean, logvar):
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per sample and latent dimension (B, D), in nats."""
    return 0.5 * (ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)


def kl_with_free_bits(kl_dims, free_bits: float):
    """Σ_d max(free_bits, E_batch[KL_d]): dimensions below `free_bits` nats are not pushed further down.

    With free_bits = 0 this is the plain batch-mean KL summed over dimensions.
    """
    per_dim = ops.mean(kl_dims, axis=0)
    if free_bits > 0:
        per_dim = ops.maximum(per_dim, free_bits)
    return ops.sum(per_dim)


def kl_warmup_weight(epoch: int, beta: float, warmup_epochs: int) -> float:
    """β·min(1, (epoch + 1) / warmup_epochs): linear warm-up reaching β at epoch warmup_epochs - 1."""
    if warmup_epochs <= 0:
        return float(beta)
    return float(beta) * min(1.0, (epoch + 1) / warmup_epochs)
