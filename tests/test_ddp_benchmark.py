"""benchmarks.ddp --curve: the section's table from records (no processes started)."""
from benchmarks import ddp


def test_the_curve_section_tabulates_bytes_accuracy_and_state_per_method(tmp_path):
    steps = ddp.ACCURACY_TASKS["digits"]["steps"]
    every = steps // ddp.CURVE_POINTS
    records = []
    for k, method in enumerate(ddp.CURVE_METHODS):
        records.append({"task": "digits", "method": method, "seed": 0, "bytes": [100 * (k + 1)] * steps,
                        "curve": [{"step": s, "accuracy": 0.5, "state_bytes": 7}
                                  for s in range(every, steps + 1, every)]})
    body = ddp._curve_section(records, ["digits"], 1, ddp.CURVE_METHODS, None)
    assert "python -m benchmarks.ddp --curve --tasks digits --seeds 1" in body
    assert f"| {steps} | 100 / 0.500 / 7 | 200 / 0.500 / 7 |" in body
    assert f"| bytes sent in the run | {100 * steps:,} |" in body
