"""Embedded CMD, the paper's variant: parameters are tied to their mode's reference a few at a time.

An embedded parameter stops training and follows ``w_i = a_i * r_m(i) + b_i``, with its slope ``a_i``
and offset ``b_i`` frozen at the round that embedded it and ``r_m`` the current value of its mode's
reference (references are never embedded and keep training, as do the parameters not embedded yet).
Between rounds the online CMD fit (:meth:`Decomposition.update`) refines every ``a, b`` at each snapshot.
"""

from __future__ import annotations

import math

import torch

from ..core import Decomposition, FlatLayout

__all__ = ["GradualEmbedding"]

_STATE = ("embedded", "tied_slope", "tied_offset", "round_slope", "round_offset")


class GradualEmbedding:
    """Which parameters follow their mode, and the frozen slope and offset they follow it with.

    Args:
        decomposition: the CMD fit of the concatenated ``params`` at the end of the warm-up.
        params: the decomposed parameters, in the decomposition's column order.
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded, non-reference parameters embedded per round (P).

    A round embeds the parameters whose fitted line moved least since the previous round, measured in
    weight units over the spread of the reference: ``|da| * std(r) + |d(a * mean(r) + b)|``.

    Memory beyond the base optimizer and the Decomposition's running statistics: per parameter, the
    embedded flag, the tied slope and offset and those of the previous round (17 bytes) on the
    decomposition's device, and a copy of flag, tied slope and offset and mode (10 bytes) on the parameter's.
    """

    def __init__(self, decomposition: Decomposition, params, every: int, fraction: float) -> None:
        d = decomposition
        self.decomposition = d
        self.params = list(params)
        self.every, self.fraction = every, fraction
        self.embedded = torch.zeros(d.num_params, dtype=torch.bool, device=d.a.device)
        self.tied_slope, self.tied_offset = torch.zeros_like(d.a), torch.zeros_like(d.b)
        self.round_slope, self.round_offset = d.a.clone(), d.b.clone()
        self.snapshots_since_round = 0
        self.rounds = 0
        self.layout = FlatLayout(self.params)
        self._is_reference = torch.zeros_like(self.embedded)
        self._is_reference[d.references] = True
        self._reference_at = self.layout.locate(d.references)  # (parameter, position) of each reference
        self._refresh_views()

    @property
    def num_embedded(self) -> int:
        return int(self.embedded.sum())

    @torch.no_grad()
    def observe(self, moving) -> None:
        """A snapshot: refit ``a, b`` online, and every ``every`` snapshots run an embedding round, after
        which the newly embedded elements of the parameters in ``moving`` are put on their line."""
        self.decomposition.update(self.layout.flatten(self.params).to(self.embedded.device))
        self.snapshots_since_round += 1
        if self.snapshots_since_round == self.every:
            self._embed_round()
            self.snapshots_since_round = 0
            self.follow(moving)

    def _embed_round(self) -> None:
        d = self.decomposition
        profile_mean = d.profiles.mean(dim=1)[d.assignment]
        profile_std = d.profiles.std(dim=1)[d.assignment]
        da = d.a - self.round_slope
        drift = da.abs() * profile_std + (da * profile_mean + d.b - self.round_offset).abs()
        candidates = ~(self.embedded | self._is_reference)
        count = math.ceil(round(self.fraction * int(candidates.sum()), 6))  # no float dust above an integer
        if count:
            chosen = torch.where(candidates, drift, math.inf).topk(count, largest=False).indices
            self.embedded[chosen] = True
            self.tied_slope[chosen] = d.a[chosen]
            self.tied_offset[chosen] = d.b[chosen]
            self._refresh_views()
        self.round_slope, self.round_offset = d.a.clone(), d.b.clone()
        self.rounds += 1

    def _refresh_views(self) -> None:
        """Per-parameter copies (on each parameter's device) of what ``follow`` reads every step."""
        self._views = []
        sources = (self.embedded, self.tied_slope.float(), self.tied_offset.float(),
                   self.decomposition.assignment.to(torch.uint8))
        for p, (start, end) in zip(self.params, self.layout.ranges()):
            if not bool(self.embedded[start:end].any()):
                self._views.append(None)
                continue
            self._views.append(tuple(t[start:end].view(p.shape).to(p.device) for t in sources))

    @torch.no_grad()
    def follow(self, moving) -> None:
        """Put the embedded elements of the parameters in ``moving`` (the others are left alone) at
        ``a * r + b``, ``r`` the references' current values."""
        moving = {id(p) for p in moving}
        references = torch.stack([self.params[i].detach().reshape(-1)[pos].float() for i, pos in self._reference_at])
        for p, view in zip(self.params, self._views):
            if view is None or id(p) not in moving:
                continue
            mask, a, b, mode = view
            target = torch.addcmul(b, a, references.to(p.device)[mode.long()])
            p.copy_(torch.where(mask, target.to(p.dtype), p))

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in _STATE},
                "snapshots_since_round": self.snapshots_since_round, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        """Take over saved state; every entry is checked before anything changes."""
        missing = [key for key in (*_STATE, "snapshots_since_round", "rounds") if key not in state]
        if missing:
            raise ValueError(f"the gradual-embedding state is missing {', '.join(missing)}")
        for key in _STATE:
            if not isinstance(state[key], torch.Tensor) or state[key].shape != getattr(self, key).shape:
                raise ValueError(f"the gradual-embedding state's {key!r} does not match this model's "
                                 f"{self.decomposition.num_params} parameters")
        for key in _STATE:
            getattr(self, key).copy_(state[key])
        self.snapshots_since_round = int(state["snapshots_since_round"])
        self.rounds = int(state["rounds"])
        self._refresh_views()
