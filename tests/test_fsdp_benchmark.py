"""benchmarks.fsdp on a tiny run (2 gloo processes, 12 steps, refreshes every 2 reduced steps): the bytes it
counts are those the low-rank reduction must send, and a rank holds less state than plain FSDP2 + AdamW."""
from benchmarks import fsdp, quality

ROWS = fsdp.ROWS[0], fsdp.ROWS[2]  # FSDP2 + AdamW, CMD(AdamW) default


def test_the_fsdp_benchmark_counts_the_low_rank_collectives_and_a_ranks_state():
    result = fsdp.measure(world=2, steps=12, rows=ROWS, refresh_every=2, timed=2)
    plain, cmd = (result["rows"][row.name] for row in ROWS)
    # FSDP2's own per step: each Linear's weight and bias gathered twice (forward, backward), its shard each time,
    # and reduce-scattered once (the whole gradient): 4 bytes x parameters x (2 / 2 + 1)
    params = sum(p.numel() for p in quality._mlp(fsdp.WIDTH).parameters())
    assert plain["fsdp_bytes"] == cmd["fsdp_bytes"] == 4 * params * 2
    assert plain["cmd_bytes"] == 0
    # CMD's extra: the whole r x n core gradient of each row-side matrix (m <= n), 2 norms per split core
    # (m > n), and the agreed non-finite checks of the gradients and of the step (1 number each)
    matrices = [m for m in cmd["switch_report"]["matrices"] if m["rank"]]
    row_side = sum(m["rank"] * m["shape"][1] for m in matrices if m["shape"][0] <= m["shape"][1])
    split = sum(1 for m in matrices if m["shape"][0] > m["shape"][1])
    assert row_side and split
    assert cmd["cmd_bytes"] == 4 * (row_side + 2 * split + 2)
    assert cmd["other_step_labels"] == ["refresh"] and cmd["other_bytes_range"][0] > cmd["cmd_bytes"]
    # each rank holds less than plain FSDP2's AdamW state per rank, and less than one process's CMD state
    assert max(cmd["state_bytes_per_rank"]) < min(plain["state_bytes_per_rank"])
    assert max(cmd["state_bytes_per_rank"]) < cmd["one_process"]["state_bytes"]
    assert cmd["weight_difference"] < 1e-4
