"""The VAE (Kingma & Welling 2014) and β-VAE (Higgins et al. 2017; Burgess et al. 2018).

Encoder q(z | x) = N(μ(x), diag σ²(x)), prior p(z) = N(0, I), decoder p(x | z) Bernoulli or
Gaussian (:mod:`aelearn.models.likelihoods`). Per example, with z = μ + σ·ε, ε ~ N(0, I):

    reconstruction = −log p(x | z)                                   (summed over pixels)
    kl             = KL(q(z | x) ‖ p(z)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)

both averaged over the batch. The VAE minimises reconstruction + kl (the negative ELBO); the β-VAE
minimises reconstruction + β·kl, or with a capacity C (Burgess et al.) reconstruction + γ·|kl − C|.
β and C may follow schedules of the step (:mod:`aelearn.schedules`): KL annealing and warm-up are
``beta = {kind = "linear", start = 0.0, end = 1.0, steps = ...}``, the growing capacity of Burgess
et al. ``capacity = {kind = "linear", start = 0.0, end = 25.0, steps = 100000}`` with ``gamma = 1000``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aelearn.models.base import GenerativeModel, split_batch
from aelearn.models.likelihoods import LIKELIHOODS
from aelearn.models.networks import build_networks
from aelearn.schedules import build_schedule


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)) per row: ``mu, logvar: [N, D] -> [N]``, in float32 at least."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


class VAE(GenerativeModel):
    """A VAE on images of ``observation_shape`` (C, H, W).

    ``latent_dim``: D. ``architecture``: "auto" (conv64 for 64×64, conv28 for 28×28, else mlp),
    "mlp", "conv64" or "conv28" (:mod:`aelearn.models.networks`); ``mlp_hidden``: hidden widths of
    the mlp. ``likelihood``: "bernoulli" or "gaussian" (with ``sigma`` and ``learn_sigma``).

    ``loss(batch, step=...)`` → {"loss", "reconstruction", "kl"}; ``posterior(x)`` → (μ, log σ²)
    ``[N, D]`` each; ``encode(x)`` → μ; ``decode(z)`` → the likelihood's mean ``[N, C, H, W]``.
    """

    def __init__(
        self,
        observation_shape: Sequence[int],
        latent_dim: int = 10,
        *,
        architecture: str = "auto",
        likelihood: str = "bernoulli",
        sigma: float = 0.1,
        learn_sigma: bool = False,
        mlp_hidden: Sequence[int] = (1200, 1200),
    ):
        super().__init__()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; valid likelihoods: {', '.join(LIKELIHOODS)}")
        self.observation_shape = tuple(observation_shape)
        self.latent_dim = latent_dim
        self.encoder, self.decoder = build_networks(architecture, self.observation_shape, latent_dim, 2 * latent_dim, mlp_hidden=mlp_hidden)
        self.likelihood = LIKELIHOODS[likelihood](sigma, learn_sigma) if likelihood == "gaussian" else LIKELIHOODS[likelihood]()

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | x), ``[N, D]`` each, for ``x: [N, C, H, W]``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        reference = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=reference.device, dtype=reference.dtype)
        return self.decode(z)

    def loss(self, batch, *, step: int = 0) -> dict[str, torch.Tensor]:
        x, _ = split_batch(batch)
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        reconstruction = self.likelihood.nll(self.decoder(z), x).mean()
        kl = gaussian_kl(mu, logvar).mean()
        return {**self.objective(reconstruction, kl, step), "reconstruction": reconstruction, "kl": kl}

    def objective(self, reconstruction: torch.Tensor, kl: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """{"loss": the total to minimise at ``step``, and the weights worth logging}."""
        return {"loss": reconstruction + kl}


class BetaVAE(VAE):
    """β-VAE: reconstruction + β·kl, or reconstruction + γ·|kl − C| when ``capacity`` is given.

    ``beta`` and ``capacity`` are numbers or schedule specs (:func:`aelearn.schedules.build_schedule`);
    their values at each step are logged ("beta", "capacity"). Other arguments as :class:`VAE`.
    """

    def __init__(self, observation_shape: Sequence[int], latent_dim: int = 10, *, beta=4.0, capacity=None, gamma: float = 1000.0, **options):
        super().__init__(observation_shape, latent_dim, **options)
        self.beta = build_schedule(beta, name="beta")
        self.capacity = None if capacity is None else build_schedule(capacity, name="capacity")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"gamma must be a number ≥ 0, got {gamma!r}")
        self.gamma = float(gamma)

    def objective(self, reconstruction: torch.Tensor, kl: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # The weights are logged as CPU tensors: creating them on a GPU would synchronise every step.
        if self.capacity is None:
            beta = self.beta(step)
            return {"loss": reconstruction + beta * kl, "beta": torch.tensor(beta)}
        capacity = self.capacity(step)
        return {"loss": reconstruction + self.gamma * (kl - capacity).abs(), "capacity": torch.tensor(capacity)}

    def extra_repr(self) -> str:
        if self.capacity is None:
            return f"beta={self.beta}"
        return f"capacity={self.capacity}, gamma={self.gamma}"
