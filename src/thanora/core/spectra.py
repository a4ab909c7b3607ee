"""Task-aware (instruction-previewed) decomposition of each adapted weight: SPEC.md §2.

Pure functions from (W, C) to a truncated `Spectrum`; they never change the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from thanora.artifacts import load_tensors, save_tensors
from thanora.core.covariance import CovarianceStats
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.targets import Target, weight_matrix

logger = logging.getLogger(__name__)


class SingularCovarianceError(ValueError):
    """The damped covariance stayed too ill-conditioned for an accurate solve."""


@dataclass(frozen=True)
class Spectrum:
    """Top-R triplets of the task-aware decomposition W = U diag(S) V̂ᵀ of one module for one task.

    Attributes:
        U: (d_out, R) left singular vectors of W·C_d.
        S: (R,) singular values, descending.
        Vh: (R, d_in) V̂ᵀ = Vᵀ C_d⁻¹.
        damping: the relative damping δ that made the solve accurate.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    damping: float

    @property
    def rank(self) -> int:
        """Number of stored triplets."""
        return int(self.S.shape[0])

    def truncate(self, rank: int) -> Spectrum:
        """The top ``rank`` triplets (rank <= stored rank)."""
        if rank > self.rank:
            raise ValueError(f"spectrum holds {self.rank} triplets, {rank} requested; recompute with a larger rank")
        return Spectrum(self.U[:, :rank], self.S[:rank], self.Vh[:rank], self.damping)


@dataclass(frozen=True)
class DampedFactor:
    """C_d = C + δ·mean(diag C)·I and its Cholesky factor L, for the smallest δ that solves accurately."""

    C_d: torch.Tensor
    L: torch.Tensor
    damping: float


def damped_factor(moment: torch.Tensor, cfg: ThanoraConfig, start: float | None = None) -> DampedFactor:
    """Damp C until the Cholesky factorisation succeeds and solves are accurate (SPEC.md §2).

    δ starts at ``start`` (default ``cfg.damping``) and doubles, at most ``cfg.max_damping_doublings`` times, until
    the relative residual ‖C_d X − P‖/‖P‖ of a solve against a fixed random probe P is below
    ``cfg.solve_tolerance``. Checking with a probe instead of the singular vectors means one SVD per module, and
    modules reading the same input (q/k/v) share the factor.

    Args:
        moment: C, (d_in, d_in) symmetric positive semi-definite; its dtype is the compute dtype.
        cfg: damping, cap and tolerance.
        start: initial δ.

    Raises:
        SingularCovarianceError: C is zero, or no δ up to the cap solves accurately.
    """
    C = moment
    dtype, device = C.dtype, C.device
    scale = torch.diagonal(C).mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise SingularCovarianceError("the input covariance is zero or not finite (the module saw only zeros)")
    probe = torch.randn(C.shape[0], 8, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    eye = torch.eye(C.shape[0], dtype=dtype, device=device)
    delta = cfg.damping if start is None else start
    residual = float("inf")
    for _ in range(cfg.max_damping_doublings + 1):
        C_d = C + (delta * scale) * eye
        L, info = torch.linalg.cholesky_ex(C_d)
        if int(info) == 0:
            residual = _solve_residual(C_d, L, probe)
            if residual <= cfg.solve_tolerance:
                return DampedFactor(C_d, L, delta)
        delta *= 2.0
    raise SingularCovarianceError(
        f"covariance too ill-conditioned: damping doubled {cfg.max_damping_doublings} times up to δ={delta / 2:g} "
        f"and the solve residual is still {residual:.2e} > solve_tolerance={cfg.solve_tolerance:g}; "
        "use stats_dtype=float64, more calibration data, or a larger damping"
    )


def _solve_residual(C_d: torch.Tensor, L: torch.Tensor, rhs: torch.Tensor) -> float:
    X = torch.cholesky_solve(rhs, L)
    return float(torch.linalg.norm(C_d @ X - rhs) / torch.linalg.norm(rhs))


def task_aware_svd(
    weight: torch.Tensor, moment: torch.Tensor, rank: int, cfg: ThanoraConfig, factor: DampedFactor | None = None
) -> Spectrum:
    """Top-``rank`` task-aware SVD of one weight (CorDA's Ŵ = SVD(W C) C⁻¹, damped; SPEC.md §2).

    With C_d = C + δ·mean(diag C)·I (see `damped_factor`), U diag(S) Vᵀ = svd(W C_d) and V̂ᵀ = Vᵀ C_d⁻¹ (Cholesky
    solve, no inverse), so U diag(S) V̂ᵀ = W when all triplets are kept. The same C_d is used on both sides. If the
    solve against the singular vectors themselves misses the tolerance, δ keeps doubling.

    Args:
        weight: W, (d_out, d_in).
        moment: C, (d_in, d_in) symmetric positive semi-definite; its dtype is the compute dtype.
        rank: number of triplets to keep (<= min(d_out, d_in)).
        cfg: damping, tolerance and SVD settings.
        factor: a `damped_factor` of ``moment`` computed before (shared by modules with the same input).

    Returns:
        The top-``rank`` `Spectrum` (compute dtype, on ``moment``'s device).

    Raises:
        SingularCovarianceError: the covariance is zero, or no damping up to the cap gave an accurate solve.
    """
    W = weight.detach().to(dtype=moment.dtype, device=moment.device)  # (d_out, d_in)
    if rank > min(W.shape):
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(W.shape)} of a {tuple(W.shape)} weight")
    factor = factor or damped_factor(moment, cfg)
    while True:
        U, S, V = _top_svd(W @ factor.C_d, rank, cfg)  # (d_out, R), (R,), (d_in, R)
        X = torch.cholesky_solve(V, factor.L)  # (d_in, R) = C_d⁻¹ V
        if float(torch.linalg.norm(factor.C_d @ X - V) / torch.linalg.norm(V)) <= cfg.solve_tolerance:
            return Spectrum(U=U, S=S, Vh=X.T.contiguous(), damping=factor.damping)
        factor = damped_factor(moment, cfg, start=2.0 * factor.damping)


# ``svd: auto`` takes the exact SVD up to this smaller dimension (cheap there: SmolLM2's largest is 576 x 1536) and the
# checked randomized one above it (a 4096 x 11008 exact SVD is minutes on a CPU, ~1 s on a GPU).
AUTO_EXACT_UP_TO = 2048


def _top_svd(M: torch.Tensor, rank: int, cfg: ThanoraConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of M (d_out, d_in): U (d_out, R), S (R,), V (d_in, R).

    ``svd: randomized`` (and ``auto`` above `AUTO_EXACT_UP_TO`) uses ``torch.svd_lowrank`` and checks the result a
    posteriori (`svd_residual`); a result above ``cfg.svd_tolerance`` is recomputed with twice the power iterations,
    then exactly.
    """
    randomized = cfg.svd == "randomized" or (cfg.svd == "auto" and min(M.shape) > AUTO_EXACT_UP_TO)
    if randomized:
        for power_iters in (cfg.svd_power_iters, 2 * cfg.svd_power_iters + 2):
            U, S, V = _randomized(M, rank, cfg.svd_oversample, power_iters)
            residual = svd_residual(M, U, S, V)
            if residual <= cfg.svd_tolerance:
                return U, S, V
            logger.debug("randomized SVD residual %.2e > svd_tolerance %.2e (power iterations %d)", residual,
                         cfg.svd_tolerance, power_iters)
        logger.info("randomized SVD of a %s matrix missed svd_tolerance=%g (residual %.2e): exact SVD instead",
                    tuple(M.shape), cfg.svd_tolerance, residual)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank].clone(), S[:rank].clone(), Vh[:rank].T.clone()  # no view pinning the full U


def _randomized(M: torch.Tensor, rank: int, oversample: int, power_iters: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = min(rank + oversample, *M.shape)
    # torch.svd_lowrank draws its test matrix from the global RNG and takes no generator: seed a forked RNG so the
    # same statistics always give the same factors, and the caller's RNG stream is left as it was.
    devices = [M.device] if M.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(M, q=q, niter=power_iters)
    return U[:, :rank].clone(), S[:rank].clone(), V[:, :rank].clone()  # no view pinning the full U


def svd_residual(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    """A posteriori error of approximate top singular triplets: max_i max(‖M v_i − s_i u_i‖, ‖Mᵀ u_i − s_i v_i‖) / s_1.

    Zero for exact triplets; a small value bounds how far each (s_i, u_i, v_i) is from an exact triplet of M
    (s_i lies within that residual of a singular value, by Weyl's theorem for the symmetric embedding). Costs two
    products with M, a fraction of the SVD.
    """
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0.0
    left = (M @ V - U * S).norm(dim=0)
    right = (M.T @ U - V * S).norm(dim=0)
    return float(torch.maximum(left, right).max() / S[0])


def decompose_task(
    model: nn.Module,
    targets: Mapping[str, Target],
    stats: CovarianceStats,
    cfg: ThanoraConfig,
    progress: bool = True,
) -> dict[str, Spectrum]:
    """Task-aware spectra of every target module for one task.

    Args:
        model: the pretrained model (weights read only).
        targets: from `find_targets`.
        stats: the task's calibration statistics.
        cfg: rank budget, damping and SVD settings.
        progress: show a tqdm bar.

    Returns:
        ``{module name: Spectrum}`` on CPU in float32.
    """
    spectra: dict[str, Spectrum] = {}
    factors: dict[str, DampedFactor] = {}  # one damped Cholesky factor per distinct input (q/k/v share one)
    for name in tqdm(targets, desc=f"decompose [{stats.task}]", disable=not progress, leave=False):
        module = model.get_submodule(name)
        key = stats.input_of[name]
        moment = stats.moments[key].to(device=module.weight.device)
        try:
            if key not in factors:
                factors = {key: damped_factor(moment, cfg)}  # inputs come in module order: keep only the current
            spectrum = task_aware_svd(weight_matrix(module), moment, cfg.rank, cfg, factors[key])
        except (SingularCovarianceError, ValueError) as err:
            raise type(err)(f"task {stats.task!r}, module {name!r}: {err}") from err
        spectra[name] = Spectrum(*(t.float().cpu() for t in (spectrum.U, spectrum.S, spectrum.Vh)), spectrum.damping)
    damped = sum(s.damping > cfg.damping for s in spectra.values())
    if damped:
        logger.info("task %s: %d modules needed more damping than δ=%g", stats.task, damped, cfg.damping)
    return spectra


def save_spectra(spectra: Mapping[str, Spectrum], path: str | Path, meta: Mapping[str, object]) -> None:
    """Write one task's spectra (and ``meta``, e.g. the config) to a safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, s in spectra.items():
        tensors[f"{name}::U"], tensors[f"{name}::S"], tensors[f"{name}::Vh"] = s.U, s.S, s.Vh
    damping = {name: s.damping for name, s in spectra.items()}
    save_tensors(tensors, path, {"meta": dict(meta), "damping": damping})


def load_spectra(path: str | Path) -> tuple[dict[str, Spectrum], dict[str, object]]:
    """Read a file written by `save_spectra`: ``({module: Spectrum}, meta)``."""
    tensors, stored = load_tensors(path)
    spectra = {
        name: Spectrum(tensors[f"{name}::U"], tensors[f"{name}::S"], tensors[f"{name}::Vh"], float(damping))
        for name, damping in stored["damping"].items()
    }
    return spectra, stored["meta"]
