import torch
from torch import nn

from cmd_optim import decompose
from cmd_optim.optim.embedding import GradualEmbedding


def planted(num_params=200, snapshots=12, seed=0):
    """Two modes (a rise and an oscillation) with affine members and small noise: (T, N), profile fn, a, b, mode."""
    gen = torch.Generator().manual_seed(seed)
    mode = torch.arange(num_params) % 2
    a = torch.rand(num_params, generator=gen) + 0.5
    b = torch.randn(num_params, generator=gen)

    def profiles(t):
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.stack([t / 10, torch.sin(t)], dim=-1)

    t = torch.arange(snapshots, dtype=torch.float32)
    trajectory = a * profiles(t)[:, mode] + b + 1e-4 * torch.randn(snapshots, num_params, generator=gen)
    return trajectory, profiles, a, b, mode


def test_a_round_embeds_the_parameters_whose_fit_drifted_least():
    trajectory, profiles, a, b, mode = planted()
    d = decompose(trajectory, modes=2, samples=200, seed=0)
    param = nn.Parameter(trajectory[-1].clone())
    embedding = GradualEmbedding(d, [param], every=1, fraction=0.5)
    references = set(d.references.tolist())  # (the decomposition covers the live parameters from the round on)
    movers = [i for i in range(200) if i not in references][::2]  # half of the candidates drift away
    steady = torch.ones(200, dtype=torch.bool)
    steady[movers] = False
    steady[list(references)] = False

    snapshot = a * profiles(12.0)[mode] + b
    snapshot[movers] += 1.0
    with torch.no_grad():
        param.copy_(snapshot)
    embedding.observe([param])

    assert embedding.rounds == 1
    assert torch.equal(embedding.embedded, steady)
    # embedded parameters now sit on their frozen line, the others were left where they were
    line = embedding.tied_slope * param.detach()[embedding.references][embedding.modes.long()] + embedding.tied_offset
    torch.testing.assert_close(param.detach()[steady], line[steady])
    assert torch.equal(param.detach()[~steady], snapshot[~steady])


def test_references_are_never_embedded_and_the_count_follows_the_fraction():
    trajectory, profiles, a, b, mode = planted()
    d = decompose(trajectory, modes=2, samples=200, seed=0)
    param = nn.Parameter(trajectory[-1].clone())
    embedding = GradualEmbedding(d, [param], every=2, fraction=0.3)
    remaining = 198
    for t in range(12, 24):
        with torch.no_grad():
            param.copy_(a * profiles(float(t))[mode] + b)
        embedding.observe([param])
        if (t - 11) % 2 == 0:
            remaining -= -(-3 * remaining // 10)  # ceil(0.3 * remaining)
        assert 200 - embedding.num_embedded == remaining + 2
    assert embedding.rounds == 6
    assert not embedding.embedded[embedding.references].any()
    assert embedding.decomposition.num_params == embedding.num_live == 200 - embedding.num_embedded
