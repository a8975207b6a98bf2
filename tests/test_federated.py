from examples import federated


def test_clients_upload_the_mode_vector_and_the_free_layer_after_the_warmup():
    rounds, warmup, clients = 8, 4, 3
    plain, cmd, embedded = federated.main(["--rounds", str(rounds), "--warmup-rounds", str(warmup),
                                           "--clients", str(clients), "--local-steps", "10", "--modes", "4"])
    n = plain["num_params"]
    head = 64 * 10 + 10
    assert plain["uploaded"] == rounds * clients * 4 * n
    assert cmd["uploaded"] == warmup * clients * 4 * n + (rounds - warmup) * clients * 4 * (cmd["modes"] + head)
    assert cmd["map_bytes"] == 5 * (n - head)
    assert plain["accuracy"] > 0.4 and cmd["accuracy"] > 0.4  # far above chance (0.1) after 80 local steps


def test_embedded_cmd_clients_upload_the_live_parameters_and_fewer_each_round():
    rounds, warmup, clients = 8, 4, 3
    _, _, embedded = federated.main(["--rounds", str(rounds), "--warmup-rounds", str(warmup), "--clients", str(clients),
                                     "--local-steps", "10", "--modes", "4", "--embed-fraction", "0.3"])
    n, per_client = embedded["num_params"], embedded["per_client"]
    assert per_client[:warmup + 1] == [4 * n] * (warmup + 1)  # the first embedded round embeds after it
    assert all(later < earlier for earlier, later in zip(per_client[warmup:], per_client[warmup + 1:])), per_client
    assert embedded["uploaded"] == clients * sum(per_client)
    assert embedded["embedded"] > 0.5 * n and embedded["accuracy"] > 0.4
