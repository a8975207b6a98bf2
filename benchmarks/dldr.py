"""DLDR baselines (Li et al., TPAMI 2022, "Low dimensional trajectory hypothesis is true").

PCA of the warm-up trajectory gives d orthonormal directions P (d, N); training then moves only
z in ``w = w_switch + P^T z``, with the gradient ``P g``. P-SGD steps z with SGD (DLDR: lr 1, momentum
0.9, the rate cut tenfold late in training); P-BFGS with BFGS and Armijo backtracking (sufficient
decrease 0.4, step shrink 0.4, at most 20 tries), on the minibatch of the step.
A benchmark baseline, not part of the package.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class Subspace:
    """The top-``dims`` principal directions of a (T, N) trajectory, anchored at ``params``' values."""

    def __init__(self, params: list[torch.nn.Parameter], trajectory: torch.Tensor, dims: int) -> None:
        self.params = params
        centered = trajectory.float() - trajectory.float().mean(dim=0)
        # PCA through the (T, T) Gram matrix: no (T, N) float64 copy, whatever N
        eigenvalues, vectors = torch.linalg.eigh((centered @ centered.T).double())
        eigenvalues = eigenvalues.flip(0)
        carrying = int((eigenvalues > 1e-5 * eigenvalues[0]).sum())  # above float32 rounding: real variance
        self.dims = min(dims, trajectory.shape[0] - 1, carrying)
        top = eigenvalues[: self.dims].sqrt()
        self.basis = ((vectors.flip(1)[:, : self.dims] / top).T.float() @ centered)  # (d, N), orthonormal rows
        self.origin = self._flat(p.detach() for p in params).clone()

    @staticmethod
    def _flat(tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def gradient(self) -> torch.Tensor:
        """(d,) ``P g`` of the parameters' current gradients."""
        return self.basis @ self._flat(p.grad for p in self.params)

    @torch.no_grad()
    def move_to(self, z: torch.Tensor) -> None:
        flat = torch.addmv(self.origin, self.basis.T, z)
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class PSGD:
    """SGD with momentum on the subspace coordinates; ``step(loss_fn)`` takes a closure returning the loss."""

    def __init__(self, subspace: Subspace, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.subspace, self.lr, self.momentum = subspace, lr, momentum
        self.z = torch.zeros(subspace.dims)
        self.velocity = torch.zeros(subspace.dims)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        loss_fn().backward()
        g = self.subspace.gradient()
        if torch.isfinite(g).all():
            self.velocity.mul_(self.momentum).add_(g)
            self.z.sub_(self.lr * self.velocity)
            self.subspace.move_to(self.z)


class PBFGS:
    """BFGS on the subspace coordinates with Armijo backtracking on each step's minibatch."""

    def __init__(self, subspace: Subspace, sufficient_decrease: float = 0.4, shrink: float = 0.4, tries: int = 20):
        self.subspace = subspace
        self.sigma, self.shrink, self.tries = sufficient_decrease, shrink, tries
        self.z = torch.zeros(subspace.dims, dtype=torch.float64)
        self.inverse_hessian = torch.eye(subspace.dims, dtype=torch.float64)

    def _loss_and_gradient(self, loss_fn, z):
        self.subspace.move_to(z.float())
        for p in self.subspace.params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach()), self.subspace.gradient().double()

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        loss, g = self._loss_and_gradient(loss_fn, self.z)
        direction = -self.inverse_hessian @ g
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            self.inverse_hessian = torch.eye(len(g), dtype=torch.float64)
            direction, slope = -g, -float(g @ g)
        alpha = 1.0
        for _ in range(self.tries):
            new_loss, new_g = self._loss_and_gradient(loss_fn, self.z + alpha * direction)
            if new_loss <= loss + self.sigma * alpha * slope:
                break
            alpha *= self.shrink
        else:  # no acceptable step: stay
            self.subspace.move_to(self.z.float())
            return
        s, y = alpha * direction, new_g - g
        self.z = self.z + s
        if float(y @ s) > 1e-12:
            rho = 1.0 / float(y @ s)
            eye = torch.eye(len(s), dtype=torch.float64)
            h = self.inverse_hessian
            self.inverse_hessian = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
