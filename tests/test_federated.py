from examples import federated


def test_clients_upload_the_mode_vector_and_the_free_layer_after_the_warmup():
    rounds, warmup, clients = 8, 4, 3
    plain, cmd = federated.main(["--rounds", str(rounds), "--warmup-rounds", str(warmup), "--clients", str(clients),
                                 "--local-steps", "10", "--modes", "4"])
    n = plain["num_params"]
    head = 64 * 10 + 10
    assert plain["uploaded"] == rounds * clients * 4 * n
    assert cmd["uploaded"] == warmup * clients * 4 * n + (rounds - warmup) * clients * 4 * (cmd["modes"] + head)
    assert cmd["map_bytes"] == 5 * (n - head)
    assert plain["accuracy"] > 0.4 and cmd["accuracy"] > 0.4  # far above chance (0.1) after 80 local steps
