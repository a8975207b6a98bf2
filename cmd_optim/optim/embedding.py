"""Embedded CMD, the paper's variant: parameters are tied to their mode's reference a few at a time.

An embedded parameter stops training and follows ``w_i = a_i * r_m(i) + b_i``, with its slope ``a_i``
and offset ``b_i`` frozen at the round that embedded it and ``r_m`` the current value of its mode's
reference (references are never embedded and keep training, as do the parameters not embedded yet).
Between rounds the online CMD fit (:meth:`Decomposition.update`) refines the ``a, b`` of the parameters
not embedded yet at each snapshot.

What an embedded parameter costs from its round on: its flag, its frozen slope and offset and its mode
(10 bytes with a float32 fit). Everything else is kept for the *live* (not yet embedded) parameters only:
the Decomposition's running statistics are cut down to their columns at each round
(:meth:`Decomposition.keep_columns`), and :attr:`GradualEmbedding.positions` tells the reduced phase which
elements of each tensor its base optimizer still steps.

Under FSDP2 (``sharding``) each rank holds the elements of its rows only: the vectors and the decomposition
cover them (its references are -1 where another rank holds one); the references' values come from one
all-reduce of M numbers (:meth:`GradualEmbedding.reference_values`), and a round ranks the drifts of all ranks
(:meth:`~cmd_optim.optim.sharding.Sharding.smallest`), so every rank embeds what one process would.
"""

from __future__ import annotations

import math

import torch

from ..core import Decomposition, FlatLayout
from ._params import tensor_bytes
from .sharding import Sharding

__all__ = ["GradualEmbedding", "gather", "local_state", "sharded_state"]

_VECTORS = ("embedded", "tied_slope", "tied_offset", "modes")  # (N,): one entry per tracked element
_LIVE = ("round_slope", "round_offset")  # one entry per live element
_COUNTS = ("snapshots_since_round", "rounds")


def gather(t: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``t``'s elements at flat ``positions`` (None: all of them), as a 1-D tensor."""
    return t.reshape(-1) if positions is None else t.reshape(-1)[positions]


class GradualEmbedding:
    """Which parameters follow their mode, and the frozen slope and offset they follow it with.

    Args:
        decomposition: the CMD fit of the concatenated ``params`` at the end of the warm-up (all of them live);
            from then on it covers the live parameters only (``decomposition.num_params == num_live``; its
            ``references`` and ``assignment`` are numbered among them).
        params: the decomposed parameters, in the decomposition's column order.
        every: snapshots between two embedding rounds (L).
        fraction: share of the not-yet-embedded, non-reference parameters embedded per round (P).
        state: a :meth:`state_dict` to restore (then ``decomposition`` is the saved one, over the live
            parameters); every entry is checked, and nothing is built unless all pass.
        sharding: under FSDP2, ``params`` are this rank's shards and ``decomposition`` is of their elements
            (:meth:`~cmd_optim.optim.sharding.Sharding.decompose`).
        references: the references' global indices (M,) at the switch (None: the decomposition's; a ``state``
            holds them).

    A round embeds the parameters whose fitted line moved least since the previous round, measured in
    weight units over the spread of the reference: ``|da| * std(r) + |d(a * mean(r) + b)|`` (ties go to the
    earlier parameter).

    Public attributes, over all N tracked elements in decomposition order: ``embedded`` (bool), ``tied_slope``
    and ``tied_offset`` (the line an embedded element follows; 0 for a live one), ``modes`` (each element's
    mode), ``references`` (each mode's reference element, by global index). ``positions``: per parameter, the
    flat positions of its live elements (an int32 tensor on its device), or None while all of them are live (no
    memory); ``live_counts``: how many each has. Under FSDP2 all of them but ``references`` cover this rank's
    elements (in its parameters' order).
    """

    def __init__(self, decomposition: Decomposition, params, every: int, fraction: float,
                 state: dict | None = None, sharding: Sharding | None = None,
                 references: torch.Tensor | None = None) -> None:
        d = decomposition
        self.params = list(params)
        self.layout = FlatLayout(self.params)
        self.every, self.fraction, self.sharding = every, fraction, sharding
        n, device = self.layout.numel, d.a.device
        if state is None:
            if d.num_params != n:
                raise ValueError(f"the decomposition has {d.num_params} parameters, the tensors {n}")
            self.embedded = torch.zeros(n, dtype=torch.bool, device=device)
            self.tied_slope, self.tied_offset = torch.zeros_like(d.a), torch.zeros_like(d.b)
            self.modes = d.assignment.to(torch.uint8 if d.num_modes <= 256 else torch.int16)
            self.references = (d.references if references is None else references).to(device).clone()
            self.round_slope, self.round_offset = d.a.clone(), d.b.clone()
            self.snapshots_since_round = self.rounds = 0
        else:
            self._take(state, d, n)
        self.decomposition = d
        here = self._here(self.references)
        self._modes_here = (here >= 0).nonzero().squeeze(1)
        self._reference_at = self.layout.locate(here[self._modes_here])  # (parameter, position) of each one here
        self._total = n if sharding is None else sharding.num_global
        self._live_total = d.num_params if sharding is None else sharding.total(d.num_params)
        self._refresh()

    def _here(self, references: torch.Tensor) -> torch.Tensor:
        """The flat position among this rank's elements of each global reference index, -1 where another rank
        holds it (without sharding: the indices themselves)."""
        return references.cpu() if self.sharding is None else self.sharding.owned(references)

    # ------------------------------------------------------------------ sizes
    @property
    def num_embedded(self) -> int:
        """Tracked elements embedded so far (all ranks')."""
        return self._total - self._live_total

    @property
    def num_live(self) -> int:
        """Tracked elements not embedded yet (the references among them; all ranks'): what the base optimizer
        steps. This rank's are ``decomposition.num_params``."""
        return self._live_total

    def live_indices(self) -> torch.Tensor:
        """(num_live,) long: the flat (decomposition-order) indices of the live elements, increasing."""
        return (~self.embedded).nonzero().squeeze(1)

    # ------------------------------------------------------------------ snapshots and rounds
    @torch.no_grad()
    def reference_values(self) -> torch.Tensor:
        """(M,) float64: the references' current values; under FSDP2 each rank's own ones, added over the ranks
        (one all-reduce)."""
        device = self.embedded.device
        values = torch.zeros(self.decomposition.num_modes, dtype=torch.float64, device=device)
        if self._reference_at:
            values[self._modes_here.to(device)] = torch.stack(
                [self.params[i].detach().reshape(-1)[pos].double().to(device) for i, pos in self._reference_at])
        if self.sharding is not None:
            self.sharding.all_reduce([values])
        return values

    @torch.no_grad()
    def observe(self, moving, values: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """A snapshot: refit the live parameters' ``a, b`` online, and every ``every`` snapshots run an embedding
        round, after which the newly embedded elements of the parameters in ``moving`` are put on their line.
        ``values``: the references' current values (:meth:`reference_values`, read if None).

        Returns None, or after a round that embedded something, per parameter the bool mask of its previous
        :attr:`positions` that are still live (what the caller's per-element state keeps)."""
        device = self.embedded.device
        values = self.reference_values() if values is None else values
        self.decomposition.update(torch.cat([gather(p.detach(), pos).to(device)
                                             for p, pos in zip(self.params, self.positions)]), values)
        self.snapshots_since_round += 1
        if self.snapshots_since_round < self.every:
            return None
        kept = self._embed_round()
        self.snapshots_since_round = 0
        self.follow(moving, values)
        return kept

    def _embed_round(self) -> list[torch.Tensor] | None:
        d = self.decomposition
        profile_mean = d.profiles.mean(dim=1)[d.assignment]
        profile_std = d.profiles.std(dim=1)[d.assignment]
        da = d.a - self.round_slope
        drift = da.abs() * profile_std + (da * profile_mean + d.b - self.round_offset).abs()
        candidates = torch.ones(d.num_params, dtype=torch.bool, device=drift.device)
        candidates[d.references[d.references >= 0]] = False
        # the references are distinct elements; no float dust above an integer
        count = math.ceil(round(self.fraction * (self._live_total - d.num_modes), 6))
        kept = None
        if count:
            chosen = self._smallest(torch.where(candidates, drift, math.inf), count)
            flat = self.live_indices()[chosen]
            self.embedded[flat] = True
            self.tied_slope[flat] = d.a[chosen]
            self.tied_offset[flat] = d.b[chosen]
            stays = ~chosen
            d.keep_columns(stays.nonzero().squeeze(1))
            kept = [piece.to(p.device) for p, piece in zip(self.params, stays.split(self.live_counts))]
            self._live_total -= count
            self._refresh()
        self.round_slope, self.round_offset = d.a.clone(), d.b.clone()
        self.rounds += 1
        return kept

    def _smallest(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """Bool mask of the ``count`` smallest ``scores`` (live elements; of all ranks under FSDP2), ties to the
        earlier element."""
        if self.sharding is not None:
            return self.sharding.smallest(scores, count, self.live_counts)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[torch.sort(scores, stable=True).indices[:count]] = True
        return chosen

    def _refresh(self) -> None:
        """Per parameter: its live positions, and views (copies on another device) of what ``follow`` reads."""
        self.positions, self._views, self.live_counts = [], [], []
        for p, (start, end) in zip(self.params, self.layout.ranges()):
            mask = self.embedded[start:end]
            if not bool(mask.any()):
                self.positions.append(None)
                self.live_counts.append(end - start)
                self._views.append(None)
                continue
            index_dtype = torch.int32 if end - start < 2**31 else torch.long  # 4 bytes per live element
            self.positions.append((~mask).nonzero().squeeze(1).to(p.device, index_dtype))
            self.live_counts.append(self.positions[-1].numel())
            dtype = p.dtype if p.dtype == torch.float64 else torch.float32
            self._views.append(tuple(t[start:end].view(p.shape).to(p.device, dtype) if t.is_floating_point()
                                     else t[start:end].view(p.shape).to(p.device)
                                     for t in (self.embedded, self.tied_slope, self.tied_offset, self.modes)))

    @torch.no_grad()
    def follow(self, moving, values: torch.Tensor | None = None) -> None:
        """Put the embedded elements of the parameters in ``moving`` (the others are left alone) at
        ``a * r + b``, ``r`` the references' current ``values`` (:meth:`reference_values`, read if None)."""
        moving = {id(p) for p in moving}
        references = self.reference_values() if values is None else values
        for p, view in zip(self.params, self._views):
            if view is None or id(p) not in moving:
                continue
            mask, a, b, mode = view
            target = torch.addcmul(b, a, references.to(p.device, a.dtype)[mode.long()])
            p.copy_(torch.where(mask, target.to(p.dtype), p))

    def reference_slots(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per parameter holding references (here, under FSDP2): ``(its index, the references' slots among its
        live elements (:attr:`positions`), their modes)``, both long tensors on its device; valid until a round."""
        owners = {}
        for mode, (index, position) in zip(self._modes_here.tolist(), self._reference_at):
            owners.setdefault(index, ([], []))
            owners[index][0].append(position)
            owners[index][1].append(mode)
        slots = []
        for index, (positions, modes) in owners.items():
            positions, modes = torch.tensor(positions), torch.tensor(modes)
            live = self.positions[index]
            if live is not None:  # a reference is live: its slot is its rank among the live positions
                positions = torch.searchsorted(live.cpu().long(), positions)
            device = self.params[index].device
            slots.append((index, positions.to(device), modes.to(device)))
        return slots

    @torch.no_grad()
    def mode_sums(self, values) -> torch.Tensor:
        """(M,) float64: per mode, ``sum_i a_i * v_i`` over its embedded elements ``i`` (``a_i`` their tied slope),
        ``values`` one tensor per parameter shaped like it (None: left out). Linear in ``values``: sums over parts
        of the parameters (a DDP bucket) or over ranks add up. Under FSDP2 this rank's elements only."""
        sums = torch.zeros(self.decomposition.num_modes, dtype=torch.float64, device=self.embedded.device)
        for v, view in zip(values, self._views):
            if v is not None and view is not None:  # a live element's tied slope is 0
                _, a, _, mode = view
                sums.index_add_(0, mode.reshape(-1).to(sums.device, torch.int32),
                                (a.double() * v.double()).reshape(-1).to(sums.device))
        return sums

    def slope_squares(self) -> torch.Tensor:
        """(M,) float64: per mode, ``sum_i a_i^2`` over its embedded elements (:meth:`mode_sums` of the slopes)."""
        return self.mode_sums([None if view is None else view[1] for view in self._views])

    # ------------------------------------------------------------------ state
    def nbytes(self) -> int:
        """Bytes held here and in the (live) decomposition; a view of :attr:`tied_slope` etc. on the same device
        and dtype costs nothing, a copy on the parameter's device counts."""
        own = [getattr(self, key) for key in (*_VECTORS, *_LIVE, "references")]
        sources = (self.embedded, self.tied_slope, self.tied_offset, self.modes)
        copies = [t for view in self._views if view is not None for t, source in zip(view, sources)
                  if (t.device, t.dtype) != (source.device, source.dtype)]
        d = self.decomposition
        return (tensor_bytes(own) + tensor_bytes(self.positions) + tensor_bytes(copies)
                + tensor_bytes(d.state_dict()) + tensor_bytes([d.a, d.b]))

    def state_dict(self) -> dict:
        """Tensors and integers (the live decomposition is saved beside it: ``decomposition.state_dict()``)."""
        return {**{key: getattr(self, key) for key in (*_VECTORS, *_LIVE, "references")},
                **{key: getattr(self, key) for key in _COUNTS}}

    def _take(self, state: dict, d: Decomposition, n: int) -> None:
        """Check a saved state against ``n`` tracked elements and the saved (live) decomposition ``d``, then
        take it over (copies)."""
        missing = [key for key in (*_VECTORS, *_LIVE, "references", *_COUNTS) if key not in state]
        if missing:
            raise ValueError(f"the gradual-embedding state is missing {', '.join(missing)} (a state saved before the "
                             "embedded elements left the base optimizer's state cannot be resumed here)")
        for key in (*_VECTORS, *_LIVE, "references"):
            if not isinstance(state[key], torch.Tensor):
                raise ValueError(f"the gradual-embedding state's {key!r} is not a tensor")
        for key in _VECTORS:
            if tuple(state[key].shape) != (n,):
                raise ValueError(f"the gradual-embedding state's {key!r} does not match this model's {n} tracked "
                                 "parameters")
        embedded = state["embedded"]
        if embedded.dtype != torch.bool:
            raise ValueError("the gradual-embedding state's 'embedded' must be a bool tensor")
        live = int((~embedded).sum())
        if live != d.num_params:
            raise ValueError(f"the gradual-embedding state has {live} live parameters, its decomposition "
                             f"{d.num_params}")
        for key in _LIVE:
            if tuple(state[key].shape) != (live,):
                raise ValueError(f"the gradual-embedding state's {key!r} must have one entry per live parameter "
                                 f"({live})")
        modes, references = state["modes"], state["references"]
        if modes.is_floating_point() or (n and (int(modes.min()) < 0 or int(modes.max()) >= d.num_modes)):
            raise ValueError(f"the gradual-embedding state's 'modes' must hold integers in [0, {d.num_modes})")
        if references.dtype != torch.long or tuple(references.shape) != (d.num_modes,):
            raise ValueError(f"the gradual-embedding state's 'references' must be {d.num_modes} integers")
        here, at = self._here(references), d.references.cpu()
        if not torch.equal(here >= 0, at >= 0) or not torch.equal(
                (~embedded).nonzero().squeeze(1).cpu()[at[at >= 0]], here[here >= 0]):
            raise ValueError("the gradual-embedding state's 'references' are not its decomposition's references")
        if not torch.equal(modes[~embedded].long().to(d.assignment.device), d.assignment):
            raise ValueError("the gradual-embedding state's 'modes' disagree with its decomposition's assignment")
        for key in _COUNTS:
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise ValueError(f"the gradual-embedding state's {key!r} must be a non-negative integer")
        if state["snapshots_since_round"] >= self.every:
            raise ValueError(f"the gradual-embedding state is {state['snapshots_since_round']} snapshots into a round "
                             f"of every={self.every}")
        device = d.a.device
        self.embedded = embedded.to(device).clone()
        self.tied_slope = state["tied_slope"].to(device, d.a.dtype).clone()
        self.tied_offset = state["tied_offset"].to(device, d.b.dtype).clone()
        self.modes = modes.to(device).clone()
        self.references = references.to(device).clone()
        self.round_slope = state["round_slope"].to(device, d.a.dtype).clone()
        self.round_offset = state["round_offset"].to(device, d.b.dtype).clone()
        self.snapshots_since_round, self.rounds = state["snapshots_since_round"], state["rounds"]


_SHARDED_FIT = ("mean", "comoment")  # the live decomposition's per-element statistics


def sharded_state(embedding: GradualEmbedding) -> tuple[dict, dict]:
    """The decomposition's and the embedding's state under FSDP2, for torch.distributed.checkpoint: what
    differs by rank as one DTensor per tracked parameter, shaped and sharded like it (per-live-element entries
    spread over all elements, 0 at the embedded ones); the decomposition's ``assignment`` and ``references``
    are left out (:func:`local_state` derives them from ``modes``, ``embedded`` and the global references)."""
    sharding, live = embedding.sharding, embedding.live_indices()

    def spread(values: torch.Tensor) -> list[torch.Tensor]:
        full = torch.zeros(embedding.embedded.numel(), dtype=values.dtype, device=values.device)
        full[live] = values
        return sharding.global_vectors(full)

    state = embedding.state_dict()
    state.update({key: sharding.global_vectors(state[key]) for key in _VECTORS})
    state.update({key: spread(state[key]) for key in _LIVE})
    fit = embedding.decomposition.state_dict()
    del fit["assignment"], fit["references"]
    fit.update({key: spread(fit[key]) for key in _SHARDED_FIT})
    return fit, state


def local_state(fit: dict, state: dict, sharding: Sharding) -> tuple[dict, dict]:
    """This rank's decomposition state and embedding state (:meth:`GradualEmbedding.state_dict`) from what
    :func:`sharded_state` saved; the two are then checked as any saved state is."""
    wanted = {"decomposition": (fit, _SHARDED_FIT), "embedding": (state, (*_VECTORS, *_LIVE, "references"))}
    for name, (entries, keys) in wanted.items():
        missing = [key for key in keys if key not in entries]
        if missing or not all(isinstance(entries[key], list) for key in keys if key != "references"):
            raise ValueError(f"the gradual-phase {name} state was not saved under FSDP2 (it needs one tensor per "
                             f"parameter of {', '.join(keys)})")
    state = {**state, **{key: sharding.local_vector(state[key]) for key in _VECTORS}}
    embedded = state["embedded"]
    if embedded.dtype != torch.bool:
        raise ValueError("the gradual-embedding state's 'embedded' must be a bool tensor")
    live = ~embedded
    state.update({key: sharding.local_vector(state[key])[live] for key in _LIVE})
    here = sharding.owned(torch.as_tensor(state["references"]).long())
    at = torch.searchsorted(live.nonzero().squeeze(1).cpu(), here)
    fit = {**fit, **{key: sharding.local_vector(fit[key])[live] for key in _SHARDED_FIT},
           "assignment": state["modes"][live].long(), "references": torch.where(here >= 0, at, -1)}
    return fit, state
