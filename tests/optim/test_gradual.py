"""Embedded CMD (reduction="gradual") keeps the base optimizer's state for the live elements only: the same
weights as stepping whole tensors, state that falls with each round, and a state that round-trips."""
import io

import pytest
import torch
from torch import nn

from cmd_optim import CMDOptimizer, Gradual, decompose
from tests._helpers import batch_index

SWITCH, STEPS = 20, 60  # a snapshot every 5 steps, a round at each: rounds after 25, 30, ..., 60

_GEN = torch.Generator().manual_seed(0)
_X = torch.randn(256, 12, generator=_GEN)
_Y = (_X[:, :3] * 2).argmax(1)
BASES = {"SGD": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
         "Adam": (torch.optim.Adam, dict(lr=1e-2)),
         "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05))}


def run(base="SGD", pack=None, steps=STEPS, start=0, model_optimizer=None, on_step=None, embedded_gradient="dropped"):
    if model_optimizer is None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
        cls, kwargs = BASES[base] if isinstance(base, str) else base
        reduction = Gradual(modes=3, samples=100, snapshot_every=5, every=1, fraction=0.3, pack=pack,
                            embedded_gradient=embedded_gradient)
        optimizer = CMDOptimizer(model, base=cls, switch_after=SWITCH, keep_free="2.bias", reduction=reduction,
                                 **kwargs)
    else:
        model, optimizer = model_optimizer
    for step in range(start, steps):
        index = batch_index(step, 256, 32)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(_X[index]), _Y[index]).backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, optimizer)
    return model, optimizer


@pytest.mark.parametrize("base", list(BASES))
def test_packed_live_elements_give_the_weights_of_stepping_whole_tensors(base):
    packed, opt = run(base, pack=True)
    whole, whole_opt = run(base, pack=False)
    assert opt.switch_report["packed"] and not whole_opt.switch_report["packed"]
    assert opt.embedding.num_embedded == whole_opt.embedding.num_embedded > 0
    for p, q in zip(packed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_the_default_packs_elementwise_bases_only():
    class Scaled(torch.optim.SGD):  # unknown to the package: it might read a whole tensor (a norm)
        pass

    _, opt = run((Scaled, dict(lr=0.05)), steps=SWITCH + 1)
    assert opt.switch_report["packed"] is False
    _, opt = run("AdamW", steps=SWITCH + 1)
    assert opt.switch_report["packed"] is True


def test_the_base_state_holds_the_live_elements_only_and_state_bytes_fall_each_round():
    seen = {}

    def record(step, optimizer):
        if step >= SWITCH and step % 5 == 0:
            state = optimizer.inner_optimizer.state
            per_element = sum(s["exp_avg"].numel() for s in state.values())
            seen[step] = (optimizer.state_bytes, per_element, optimizer.embedding.num_live)

    model, opt = run("Adam", on_step=record)
    free = model[2].bias.numel()
    for step, (_, per_element, live) in seen.items():
        assert per_element == live + free, step
    state_bytes = [seen[step][0] for step in sorted(seen)]
    assert all(later < earlier for earlier, later in zip(state_bytes, state_bytes[1:])), state_bytes
    assert state_bytes[-1] < state_bytes[0] / 2.5
    assert opt.embedding.num_live == opt.decomposition.num_params == opt.trainable_dims - free


PLAIN_SGD = (torch.optim.SGD, dict(lr=0.05))  # a step is -lr times the gradient it is given


@pytest.mark.parametrize("embedded_gradient", ["dropped", "pooled"])
def test_a_reference_steps_on_its_own_or_its_modes_pooled_gradient(embedded_gradient):
    model, opt = run(PLAIN_SGD, steps=42, embedded_gradient=embedded_gradient)
    embedding = opt.embedding
    index = batch_index(42, 256, 32)
    opt.zero_grad()
    nn.functional.cross_entropy(model(_X[index]), _Y[index]).backward()
    tracked = [p for p in model.parameters() if p is not model[2].bias]
    before = torch.cat([p.detach().reshape(-1) for p in tracked])
    grad = torch.cat([p.grad.reshape(-1) for p in tracked]).double()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in tracked])
    slope, pooled_differs = embedding.tied_slope.double(), 0
    for mode, reference in enumerate(embedding.references.tolist()):
        members = embedding.embedded & (embedding.modes.long() == mode)
        pooled = (grad[reference] + (slope[members] * grad[members]).sum()) / (1 + (slope[members] ** 2).sum())
        expected = pooled if embedded_gradient == "pooled" else grad[reference]
        torch.testing.assert_close(after[reference] - before[reference], (-0.05 * expected).float(), rtol=1e-4,
                                   atol=1e-8)
        pooled_differs += bool(abs(pooled - grad[reference]) > 1e-3 * abs(grad[reference]) + 1e-7)
    assert pooled_differs >= 2  # the members' gradients are not on their line: the two differ


def test_embedded_gradient_is_validated_and_pooled_needs_the_packed_phase():
    with pytest.raises(ValueError, match="embedded_gradient must be one of 'dropped', 'pooled'"):
        Gradual(embedded_gradient="summed")
    with pytest.raises(ValueError, match="embedded_gradient='pooled' needs the packed phase.*pack=True"):
        run(pack=False, steps=0, embedded_gradient="pooled")


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("embedded_gradient", ["dropped", "pooled"])
@pytest.mark.parametrize("base", ["SGD", "Adam"])
def test_a_state_saved_mid_embedding_resumes_bit_identically(base, embedded_gradient):
    whole, _ = run(base, embedded_gradient=embedded_gradient)
    model, opt = run(base, steps=42, embedded_gradient=embedded_gradient)  # 4 rounds in, 2 snapshots into the next
    assert opt.embedding.num_embedded > 0 and opt.embedding.rounds == 4
    saved = _roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    fresh_model, fresh = run(base, steps=0, embedded_gradient=embedded_gradient)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    assert fresh.phase == "reduced" and fresh.embedding.num_live == opt.embedding.num_live
    run(base, start=42, model_optimizer=(fresh_model, fresh))
    for p, q in zip(whole.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def _corruptions(state):
    """Saved states that must be refused, each with a message fragment."""
    embedding = state["cmd"]["phase_state"]["embedding"]
    flipped = embedding["embedded"].clone()
    flipped[int((~flipped).nonzero()[-1])] = True  # one more embedded than the fit's columns say
    yield {**embedding, "embedded": flipped}, None, "live parameters"
    yield {**embedding, "tied_slope": embedding["tied_slope"][:-1]}, None, "tied_slope"
    yield {**embedding, "rounds": -1}, None, "rounds"
    shrunk = {k: dict(v) for k, v in state["state"].items()}
    first = next(k for k, v in shrunk.items() if "momentum_buffer" in v)
    shrunk[first]["momentum_buffer"] = shrunk[first]["momentum_buffer"][:-1]
    yield embedding, shrunk, "momentum_buffer"


def test_a_refused_state_leaves_the_optimizer_as_it_was():
    model, opt = run("SGD", steps=42)
    good = _roundtrip(opt.state_dict())
    for embedding, base_state, message in _corruptions(good):
        bad = {**good, "cmd": {**good["cmd"], "phase_state": {**good["cmd"]["phase_state"], "embedding": embedding}}}
        if base_state is not None:
            bad["state"] = base_state
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
    twin_model, twin = run("SGD", steps=42)
    run("SGD", start=42, model_optimizer=(model, opt))
    run("SGD", start=42, model_optimizer=(twin_model, twin))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_keep_columns_refits_the_kept_parameters_as_the_whole_fit_does():
    gen = torch.Generator().manual_seed(1)
    trajectory = torch.randn(8, 60, generator=gen).cumsum(0)
    whole = decompose(trajectory, modes=3, samples=60, seed=0)
    part = decompose(trajectory, modes=3, samples=60, seed=0)
    keep = torch.tensor(sorted({*range(0, 60, 3), *whole.references.tolist()}))
    part.keep_columns(keep)
    assert torch.equal(keep[part.references], whole.references)
    snapshot = torch.randn(60, generator=gen)
    whole.update(snapshot)
    part.update(snapshot[keep])
    assert torch.equal(part.a, whole.a[keep]) and torch.equal(part.b, whole.b[keep])
    with pytest.raises(ValueError, match="reference"):
        part.keep_columns(torch.tensor([i for i in range(part.num_params) if i != int(part.references[0])]))
