"""Embedded CMD, the paper's variant: parameters are tied to their mode's reference a few at a time.

An embedded parameter stops training and follows ``w_i = a_i * r_m(i) + b_i``, with ``a_i, b_i`` frozen
at the round that embedded it and ``r_m`` the current value of its mode's reference (references are never
embedded and keep training, as do the parameters not embedded yet). Between rounds the online CMD fit
(:meth:`Decomposition.update`) refines ``a, b`` of everything at every snapshot.
"""
from __future__ import annotations

import math

import torch

from .decomposition import Decomposition


class GradualEmbedding:
    """Which parameters follow their mode, and the frozen ``(a, b)`` they follow it with.

    Args:
        decomposition: the CMD fit of the concatenated ``params`` at the end of the warm-up.
        params: the decomposed parameters, in the decomposition's column order.
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded, non-reference parameters embedded per round (P).

    A round embeds the parameters whose fitted line moved least since the previous round, measured in
    weight units over the spread of the reference: ``|da| * std(r) + |d(a * mean(r) + b)|``.

    Memory beyond the base optimizer and the Decomposition's running statistics: per parameter, the
    embedded flag, the frozen ``a, b`` and the ``a, b`` of the previous round (17 bytes) on the
    decomposition's device, and a copy of flag, frozen ``a, b`` and mode (10 bytes) on the parameter's.
    """

    def __init__(self, decomposition: Decomposition, params, every: int, fraction: float) -> None:
        d = decomposition
        self.decomposition = d
        self.params = list(params)
        self.every, self.fraction = every, fraction
        self.embedded = torch.zeros(d.num_params, dtype=torch.bool, device=d.a.device)
        self.frozen_a, self.frozen_b = torch.zeros_like(d.a), torch.zeros_like(d.b)
        self.window_a, self.window_b = d.a.clone(), d.b.clone()
        self.snapshots_since_round = 0
        self.rounds = 0
        sizes = [p.numel() for p in self.params]
        self._offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self._is_reference = torch.zeros_like(self.embedded)
        self._is_reference[d.references] = True
        # (parameter index, flat position) of each mode's reference
        bounds = torch.tensor(self._offsets[1:])
        self._reference_at = [(int(i), int(r) - self._offsets[int(i)])
                              for r, i in zip(d.references, torch.searchsorted(bounds, d.references, right=True))]
        self._refresh_views()

    @property
    def num_embedded(self) -> int:
        return int(self.embedded.sum())

    @torch.no_grad()
    def observe(self) -> None:
        """A snapshot: refit ``a, b`` online, and every ``every`` snapshots run an embedding round."""
        self.decomposition.update(torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.embedded.device))
        self.snapshots_since_round += 1
        if self.snapshots_since_round == self.every:
            self._embed_round()
            self.snapshots_since_round = 0
            self.follow()

    def _embed_round(self) -> None:
        d = self.decomposition
        profile_mean = d.profiles.mean(dim=1)[d.assignment]
        profile_std = d.profiles.std(dim=1)[d.assignment]
        da = d.a - self.window_a
        drift = da.abs() * profile_std + (da * profile_mean + d.b - self.window_b).abs()
        candidates = ~(self.embedded | self._is_reference)
        count = math.ceil(round(self.fraction * int(candidates.sum()), 6))  # no float dust above an integer
        if count:
            chosen = torch.where(candidates, drift, math.inf).topk(count, largest=False).indices
            self.embedded[chosen] = True
            self.frozen_a[chosen] = d.a[chosen]
            self.frozen_b[chosen] = d.b[chosen]
            self._refresh_views()
        self.window_a, self.window_b = d.a.clone(), d.b.clone()
        self.rounds += 1

    def _refresh_views(self) -> None:
        """Per-parameter copies (on each parameter's device) of what ``follow`` reads every step."""
        self._views = []
        sources = (self.embedded, self.frozen_a.float(), self.frozen_b.float(), self.decomposition.assignment.to(torch.uint8))
        for p, start, end in zip(self.params, self._offsets, self._offsets[1:]):
            if not bool(self.embedded[start:end].any()):
                self._views.append(None)
                continue
            self._views.append(tuple(t[start:end].view_as(p).to(p.device) for t in sources))

    @torch.no_grad()
    def follow(self) -> None:
        """Move every embedded parameter to ``a * r + b`` at the references' current values."""
        references = torch.stack([self.params[i].detach().reshape(-1)[pos].float() for i, pos in self._reference_at])
        for p, view in zip(self.params, self._views):
            if view is None:
                continue
            mask, a, b, mode = view
            target = torch.addcmul(b, a, references.to(p.device)[mode.long()])
            p.copy_(torch.where(mask, target.to(p.dtype), p))

    def state_dict(self) -> dict:
        return {"embedded": self.embedded, "frozen_a": self.frozen_a, "frozen_b": self.frozen_b,
                "window_a": self.window_a, "window_b": self.window_b,
                "snapshots_since_round": self.snapshots_since_round, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        for key in ("embedded", "frozen_a", "frozen_b", "window_a", "window_b"):
            getattr(self, key).copy_(state[key])
        self.snapshots_since_round = state["snapshots_since_round"]
        self.rounds = state["rounds"]
        self._refresh_views()
