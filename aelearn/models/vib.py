"""The Deep Variational Information Bottleneck (Alemi et al. 2017, "Deep Variational Information Bottleneck").

A stochastic encoder q(z|x) = N(μ(x), diag σ²(x)) and a classifier p(y|z) trained on

    loss = E[−log p(y|z)] + β · KL(q(z|x) ‖ p(z)),      z = μ + σ·ε, p(z) = N(0, I),

the variational bound on I(Z; Y) − β I(Z; X). The KL is the rate R, the cross-entropy the class
distortion D_y: the supervised rate–distortion plane of :func:`aelearn.metrics.rate_distortion.
rate_distortion_supervised`. Alemi et al. use a linear softmax classifier ("a simple logistic
regression") and β around 1e-3 on MNIST; β may follow a schedule as in the β-VAE.

Labels come from the batch: class labels ``[N]`` (−1: unlabelled, left out of the cross-entropy),
or, for a :class:`~aelearn.data.FactorDataset`, the column ``label_factor`` of the factors ``[N, F]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aelearn.models.base import Model, split_batch
from aelearn.models.networks import build_networks
from aelearn.models.vae import gaussian_kl
from aelearn.schedules import build_schedule


class VIB(Model):
    """A VIB classifier of ``num_classes`` classes on images of ``observation_shape`` (C, H, W).

    ``latent_dim``: D. ``architecture`` / ``mlp_hidden``: the encoder, as in :class:`aelearn.models.VAE`.
    ``classifier_hidden``: widths of the classifier's ReLU layers (``()``: linear softmax, Alemi et al.).
    ``beta``: a number or schedule spec. ``label_factor``: for batches of factors, the factor that is
    the class: an index, or a name of ``factor_names`` (given with it, or filled by
    :meth:`for_dataset`); None for batches of class labels.

    ``loss(batch, step=...)`` → {"loss", "class_nll", "rate", "beta", "accuracy"}; ``posterior(x)`` →
    (μ, log σ²) ``[N, D]``; ``encode(x)`` → μ; ``class_logits(z)`` → ``[N, num_classes]``;
    ``class_nll(z, y)`` → ``[N]``; ``predict(x)`` → the most likely class ``[N]`` at z = μ;
    ``targets(labels)`` → the class of each example ``[N]`` from a batch's labels or factors.
    """

    def __init__(
        self,
        observation_shape: Sequence[int],
        latent_dim: int = 256,
        *,
        num_classes: int = 10,
        beta=1e-3,
        label_factor: int | str | None = None,
        factor_names: Sequence[str] | None = None,
        architecture: str = "auto",
        mlp_hidden: Sequence[int] = (1024, 1024),
        classifier_hidden: Sequence[int] = (),
    ):
        super().__init__()
        for name, value, minimum in (("latent_dim", latent_dim, 1), ("num_classes", num_classes, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
        self.observation_shape = tuple(observation_shape)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.beta = build_schedule(beta, name="beta")
        self.label_column = self._label_column(label_factor, factor_names)
        # build_networks makes a decoder too: a VIB has none, so only the encoder is kept.
        self.encoder, _ = build_networks(architecture, self.observation_shape, latent_dim, 2 * latent_dim, mlp_hidden=mlp_hidden)
        layers: list[nn.Module] = []
        inputs = latent_dim
        for units in classifier_hidden:
            if isinstance(units, bool) or not isinstance(units, int) or units < 1:
                raise ValueError(f"classifier_hidden must hold positive ints, got {tuple(classifier_hidden)!r}")
            layers += [nn.Linear(inputs, units), nn.ReLU(inplace=True)]
            inputs = units
        self.classifier = nn.Sequential(*layers, nn.Linear(inputs, num_classes))

    @staticmethod
    def _label_column(label_factor, factor_names) -> int | None:
        if label_factor is None or (isinstance(label_factor, int) and not isinstance(label_factor, bool)):
            if label_factor is not None and label_factor < 0:
                raise ValueError(f"label_factor must be a factor index ≥ 0 or a name, got {label_factor}")
            return label_factor
        if not isinstance(label_factor, str):
            raise ValueError(f"label_factor must be a factor index, a factor name or None, got {label_factor!r}")
        if factor_names is None or label_factor not in factor_names:
            known = ", ".join(factor_names) if factor_names else "none given (pass factor_names, or use VIB.for_dataset)"
            raise ValueError(f"label_factor {label_factor!r} is not a factor name; factor_names: {known}")
        return list(factor_names).index(label_factor)

    @classmethod
    def for_dataset(cls, dataset, *, label_factor: int | str | None = None, **options) -> VIB:
        """A VIB for ``dataset``: its observation shape, and for a factor dataset the class count of
        ``label_factor`` (with ``factor_names`` filled, so a name works)."""
        if label_factor is None:
            return cls(dataset.observation_shape, **options)
        names, sizes = getattr(dataset, "factor_names", None), getattr(dataset, "factor_sizes", None)
        if sizes is None:
            raise ValueError(f"label_factor needs a dataset with factors; {type(dataset).__name__} has no factor_sizes")
        column = cls._label_column(label_factor, names)
        if column >= len(sizes):
            raise ValueError(f"label_factor {label_factor} is out of range: the dataset has {len(sizes)} factors")
        options.setdefault("num_classes", sizes[column])
        return cls(dataset.observation_shape, label_factor=column, **options)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | x), ``[N, D]`` each, for ``x: [N, C, H, W]``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def class_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def class_nll(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """−log p(y | z) per example, ``[N]`` nats, in float32 at least."""
        return F.cross_entropy(self.class_logits(z).float(), y, reduction="none")

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely class ``[N]`` int64 at the posterior mean."""
        return self.class_logits(self.encode(x)).argmax(1)

    def targets(self, labels: torch.Tensor | None) -> torch.Tensor:
        """The class ``[N]`` int64 of each example (−1: unlabelled) from a batch's labels ``[N]`` or factors ``[N, F]``."""
        if labels is None:
            raise ValueError("a VIB needs labelled batches (images, labels) or (images, factors); got images only")
        if labels.dim() == 2:
            if self.label_column is None:
                raise ValueError(f"batches hold factors [N, {labels.shape[1]}]: set label_factor to choose the class factor")
            if self.label_column >= labels.shape[1]:
                raise ValueError(f"label_factor {self.label_column} is out of range for factors of shape {tuple(labels.shape)}")
            labels = labels[:, self.label_column]
        elif labels.dim() != 1:
            raise ValueError(f"labels must be [N] classes or [N, F] factors, got shape {tuple(labels.shape)}")
        elif self.label_column is not None:
            raise ValueError("label_factor is set but the batches hold class labels [N], not factors")
        labels = labels.long()
        if len(labels) and (int(labels.max()) >= self.num_classes or int(labels.min()) < -1):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) (or -1: unlabelled), got values from {int(labels.min())} to {int(labels.max())}")
        return labels

    def loss(self, batch, *, step: int = 0) -> dict[str, torch.Tensor]:
        x, labels = split_batch(batch)
        y = self.targets(labels)
        labelled = y >= 0
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rate = gaussian_kl(mu, logvar).mean()
        logits = self.class_logits(z[labelled])
        # A batch without labels has no class term (0, not the NaN of an empty mean).
        class_nll = F.cross_entropy(logits.float(), y[labelled], reduction="sum") / labelled.sum().clamp_min(1)
        accuracy = (logits.argmax(1) == y[labelled]).float().sum() / labelled.sum().clamp_min(1)
        beta = self.beta(step)
        return {
            "loss": class_nll + beta * rate,
            "class_nll": class_nll,
            "rate": rate,
            "beta": torch.tensor(beta),
            "accuracy": accuracy.detach(),
        }

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, beta={self.beta}, label_factor={self.label_column}"
