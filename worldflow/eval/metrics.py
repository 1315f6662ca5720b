"""Image-quality metrics on frames in [0, 1]: PSNR and SSIM (Wang et al. 2004, Gaussian window), and the
Fréchet distance between feature distributions (Heusel et al. 2017), from feature sets or from running
moments (:class:`GaussianMoments`, constant memory however many frames are scored).

PSNR and SSIM take float tensors (..., H, W, 3) in [0, 1] and reduce over the last three dims, so a
(B, T, H, W, 3) input gives (B, T) per-frame values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from worldflow.data.pixels import to_unit

# frames (..., S, S, 3) uint8 or float [0, 1] -> {object name: bool cell grid (..., rows, cols)}; an env's
# reader (worldflow.envs.object_reader) scores where the objects are, which PSNR does not
ObjectReader = Callable[[np.ndarray], dict[str, np.ndarray]]
# a frame checker (worldflow.envs.frame_checker): frames (..., H, W, 3) -> bool (...), "the env can show it"
FrameChecker = Callable[[np.ndarray], np.ndarray]


def psnr(pred: torch.Tensor, target: torch.Tensor, max_val: float = 1.0, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(max^2 / MSE). Shapes (..., H, W, C) -> (...)."""
    mse = ((to_unit(pred) - to_unit(target)) ** 2).mean(dim=(-1, -2, -3))
    return 10.0 * torch.log10(max_val**2 / (mse + eps))


def pooled_psnr(pred: torch.Tensor, target: torch.Tensor, max_val: float = 1.0) -> float:
    """PSNR of the mean squared error over every image of the batch, 10 log10(max^2 / mean MSE), in dB.

    Unlike the mean of per-image PSNR, one exactly repeated frame (MSE 0, 100 dB under ``psnr``'s eps)
    cannot dominate it: on games where most steps leave the frame unchanged, copy-last's per-frame mean
    is set by those repeats, the pooled value by the frames that did change.
    """
    mse = ((to_unit(pred) - to_unit(target)) ** 2).mean()
    return float(10.0 * torch.log10(max_val**2 / mse.clamp_min(1e-10)))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 7, sigma: float = 1.5,
         max_val: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (mean over pixels and channels). Shapes (..., H, W, C) -> (...).

    Gaussian-weighted local statistics with C1 = (0.01 L)^2, C2 = (0.03 L)^2; 'valid' windows only, as
    in the reference implementation. The window shrinks for images smaller than it.
    """
    a, b = to_unit(pred), to_unit(target)
    lead = a.shape[:-3]
    h, w, c = a.shape[-3:]
    window = min(window, h, w)
    a = a.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    b = b.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    g = _gaussian_window(window, sigma, a.device)
    kx, ky = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kx), ky)

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    per = (num / den).mean(dim=(-1, -2)).view(-1, c).mean(-1)
    return per.view(lead)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets x (N, D) and y (M, D):

        ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2))

    (the distance behind FID, Heusel et al. 2017, on whatever features are given). Computed in float64;
    the trace of the matrix square root is the sum of sqrt(eigenvalues) of S_x^(1/2) S_y S_x^(1/2), which
    is symmetric positive semi-definite, so no complex square root or iterative solver is needed.
    Covariances use N - 1 (unbiased). Returns a float >= 0.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected feature sets (N, D) and (M, D), got {tuple(x.shape)}, {tuple(y.shape)}")
    return GaussianMoments.of(x).frechet(GaussianMoments.of(y))


def frechet_from_moments(mu_x: torch.Tensor, s_x: torch.Tensor, mu_y: torch.Tensor, s_y: torch.Tensor
                         ) -> float:
    """:func:`frechet_distance` from means (D,) and covariances (D, D) (float64 recommended)."""
    mu_x, s_x, mu_y, s_y = (t.double() for t in (mu_x, s_x, mu_y, s_y))
    evals, evecs = torch.linalg.eigh(s_x)
    root_x = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T  # S_x^(1/2)
    cross = torch.linalg.eigvalsh(root_x @ s_y @ root_x).clamp(min=0).sqrt().sum()
    d = (mu_x - mu_y).square().sum() + torch.trace(s_x) + torch.trace(s_y) - 2 * cross
    return float(d.clamp(min=0))


class GaussianMoments:
    """Running count, sum and sum of outer products of feature rows (float64): the sufficient statistics
    of a Gaussian fit, so a Fréchet distance over any number of rows needs O(D^2) memory, not O(N D).

    ``add(x)`` takes rows (N, D); ``mean`` and ``cov`` (unbiased, N - 1) read the fit; ``frechet(other)``
    is :func:`frechet_distance` between the two fits. Sums in float64 keep the one-pass covariance
    (E[xx^T] - mu mu^T) accurate for bounded features such as tokenizer latents.
    """

    def __init__(self, dim: int):
        self.dim, self.n = dim, 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    @classmethod
    def of(cls, x: torch.Tensor) -> GaussianMoments:
        """The moments of the rows of x (N, D)."""
        m = cls(x.shape[1])
        m.add(x)
        return m

    def add(self, x: torch.Tensor) -> None:
        """Accumulate rows x (N, D) (any device and float dtype)."""
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.dim)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        if self.n < 2:
            raise ValueError("each feature set needs at least 2 rows for a covariance")
        mu = self.mean
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def frechet(self, other: GaussianMoments) -> float:
        """Fréchet distance between the Gaussian fits of self and other (ValueError below 2 rows each)."""
        return frechet_from_moments(self.mean, self.cov, other.mean, other.cov)


class Reservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream (Vitter's Algorithm R), so a
    statistic can be computed at a fixed sample count from a window of any length in O(capacity · D)
    memory. Row k of the stream (0-based) replaces a random kept row with probability capacity / (k + 1);
    every random choice comes from ``generator`` (worldflow.rng), so a seed gives the same sample."""

    def __init__(self, capacity: int, dim: int, generator: torch.Generator | None = None):
        self.capacity, self.generator, self.n = capacity, generator, 0
        self.rows = torch.empty(0, dim)

    def add(self, x: torch.Tensor) -> None:
        """Offer rows x (N, D) in order."""
        from worldflow import rng

        x = x.detach().to("cpu", torch.float32).reshape(-1, self.rows.shape[1])
        room = max(0, self.capacity - len(self.rows))
        self.rows = torch.cat([self.rows, x[:room]])
        rest = x[room:]
        if len(rest):
            k = torch.arange(self.n + room, self.n + len(x), dtype=torch.float64)  # stream positions
            u = rng.rand((len(rest),), self.generator, dtype=torch.float64)
            j = (u * (k + 1)).floor().long()  # uniform on {0, ..., k}
            for i in torch.nonzero(j < self.capacity).flatten().tolist():  # in stream order: later wins
                self.rows[j[i]] = rest[i]
        self.n += len(x)


def object_match(got: dict, want: dict, lead: int) -> dict:
    """Per object: does each predicted frame have exactly the true object cells?

    got, want: an object reader's output (worldflow.envs.object_reader) on predicted and true frames,
    {name: bool array (*L, *cells)} with ``lead`` leading dims L (e.g. 2 for clips × frames); each
    object may have its own cell shape. Returns {name: bool array L}.
    """
    return {k: (got[k] == w).reshape(*w.shape[:lead], -1).all(-1) for k, w in want.items()}


def rank_average(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of a 1-D tensor, ties sharing their average rank (float64)."""
    x = x.detach().to("cpu", torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two equally long 1-D samples: the Pearson correlation of their
    average ranks (ties handled). None with fewer than 3 pairs or when either side is constant."""
    x, y = x.flatten(), y.flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equally long samples, got {x.numel()} and {y.numel()}")
    if x.numel() < 3:
        return None
    rx, ry = rank_average(x), rank_average(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None
