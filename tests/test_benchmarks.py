"""The benchmark code itself: baselines that must be right for the comparisons to mean anything."""
import dataclasses
import json
import math
import sys

import pytest
import torch

from benchmarks import dldr, quality


def test_dldr_subspace_recovers_a_planted_trajectory_subspace():
    gen = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(200, 3, generator=gen)).Q.T  # (3, 200) orthonormal
    trajectory = torch.randn(12, 3, generator=gen) @ directions + torch.randn(200, generator=gen)
    params = [torch.nn.Parameter(trajectory[-1].clone())]
    subspace = dldr.Subspace(params, trajectory, dims=40)
    assert subspace.dims == 3  # only the directions that carry variance
    # the planted directions lie in the span of the first three principal directions
    torch.testing.assert_close(subspace.basis @ subspace.basis.T, torch.eye(3), atol=1e-4, rtol=0)
    captured = (directions @ subspace.basis.T).norm(dim=1)
    torch.testing.assert_close(captured, torch.ones(3), atol=1e-4, rtol=0)


def test_p_bfgs_minimises_a_quadratic_inside_the_subspace():
    gen = torch.Generator().manual_seed(1)
    trajectory = torch.randn(6, 50, generator=gen)
    params = [torch.nn.Parameter(trajectory[-1].clone())]
    subspace = dldr.Subspace(params, trajectory, dims=5)
    target = subspace.origin + subspace.basis.T @ torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    scales = torch.rand(50, generator=gen) + 0.5
    optimizer = dldr.PBFGS(subspace)
    loss = lambda: (scales * (params[0] - target) ** 2).sum()  # noqa: E731
    for _ in range(30):
        optimizer.step(loss)
    assert float(loss().detach()) < 1e-8


def test_quality_suite_records_every_method(tmp_path, monkeypatch):
    small = dataclasses.replace(quality.TASKS["digits"], steps=60, warmup=30, snapshot_every=5)
    monkeypatch.setitem(quality.TASKS, "digits", small)
    monkeypatch.setattr(sys, "argv", ["quality", "--tasks", "digits", "--seeds", "1", "--json",
                                      str(tmp_path / "q.json"), "--no-write"])
    quality.main()
    records = json.loads((tmp_path / "q.json").read_text())
    expected = [m for m in quality.METHODS if not m.startswith("LoRA")]
    expected[1:1] = ["switch(SGD)"]
    expected.insert(expected.index("AdamW") + 1, "switch(AdamW)")
    assert [r["method"] for r in records] == expected
    for r in records:
        assert {"task", "method", "seed", "test_acc", "trainable_dims", "wall_s", "optimizer_bytes"} <= set(r)
    by_method = {r["method"]: r for r in records}
    assert by_method["CMD(SGD), modes"]["trainable_dims"] <= 10
    # the default's optimizer state: never above the base's own, at most 0.35x AdamW's
    assert 0 < by_method["CMD(SGD)"]["optimizer_bytes"] <= by_method["SGD"]["optimizer_bytes"]
    assert 0 < by_method["CMD(AdamW)"]["optimizer_bytes"] <= 0.35 * by_method["AdamW"]["optimizer_bytes"]
    assert by_method["CMD(SGD)"]["trainable_dims"] < by_method["SGD"]["trainable_dims"]
    assert by_method["SGD"]["test_acc"] > 0.5 and by_method["CMD(SGD)"]["test_acc"] > 0.5
    switch = by_method["switch(SGD)"]
    assert switch["trainable_dims"] == 0 and switch["test_loss"] > by_method["SGD"]["test_loss"]
    share = quality.recovery(records, "digits", "CMD(SGD)", "test_loss")
    expected = ((by_method["CMD(SGD)"]["test_loss"] - switch["test_loss"])
                / (by_method["SGD"]["test_loss"] - switch["test_loss"]))
    assert share == pytest.approx(expected)


@pytest.mark.slow
def test_cifar10_script_learns_on_fake_data():
    pytest.importorskip("torchvision")
    from benchmarks import cifar10_resnet18

    records = cifar10_resnet18.main(["--fake", "--fake-size", "128", "--batch", "32", "--epochs", "3",
                                     "--warmup-epochs", "2", "--device", "cpu"])
    assert [r["method"] for r in records] == ["SGD", "CMD(SGD)"]
    sgd, cmd = records
    assert cmd["phase"] == "reduced" and cmd["trainable_dims"] <= 10
    assert sgd["trainable_dims"] == sum(p.numel() for p in cifar10_resnet18.resnet18().parameters())
    # ten noisy class patterns: chance is 0.1, both runs learn them
    assert sgd["test_acc"] > 0.2 and cmd["test_acc"] > 0.2


def test_step_cost_measures_every_optimizer_against_adamw():
    from benchmarks import step_cost

    num_params, rows = step_cost.measure(step_cost.digits_shapes(hidden=16), repeats=3)
    assert num_params == 16 * 64 + 16 + 16 * 16 + 16 + 10 * 16 + 10
    by_name = {name: (seconds, ratio, own, state) for name, seconds, ratio, own, state in rows}
    assert list(by_name) == list(step_cost.CONTENDERS)
    assert by_name["AdamW"][1] == 1.0 and 8.0 <= by_name["AdamW"][3] < 8.1  # two moments, the step counts
    assert by_name["CMD(AdamW), warm-up"][2] == by_name["CMD(AdamW), warm-up"][1]  # its base is AdamW
    for name in ("CMD(SGD momentum), reduced, modes", "CMD(AdamW), reduced, modes"):  # the map, the mode state
        assert by_name[name][0] > 0 and 5.0 <= by_name[name][3] < 5.2
    sgd_warmup = by_name["CMD(SGD momentum), warm-up, modes"][3]  # momentum + the buffer of a 50-step warm-up
    assert sgd_warmup == pytest.approx(4 + 4 * (50 // 10 + 1), rel=0.01)
    for name in ("CMD(SGD momentum), reduced", "CMD(AdamW), reduced"):  # a low-rank core per matrix
        assert by_name[name][0] > 0 and by_name[name][3] > 2  # (full rank at this size: U, V cost much)


def _tiny_workload():
    from benchmarks import harness_tasks, step_cost

    def batch():
        gen = torch.Generator().manual_seed(0)
        return torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    return step_cost.Workload(lambda: harness_tasks.MLP(32), batch, lora_save=("head",))


def test_step_cost_whole_step_times_cmd_and_the_peers_beside_adamw():
    from benchmarks import step_cost

    num_params, rows = step_cost.measure_whole(_tiny_workload(), repeats=3)
    assert num_params == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    by_name = {r.method: r for r in rows}
    assert list(by_name) == list(step_cost.WHOLE_METHODS)
    for r in rows:  # every time and ratio measured, finite and positive
        for value in (r.whole_s, r.step_s, r.whole_ratio, r.step_ratio):
            assert math.isfinite(value) and value > 0, (r.method, value)
        assert r.step_s < r.whole_s  # the step is timed inside the whole step
    adamw, cmd, galore, lora = (by_name[name] for name in step_cost.WHOLE_METHODS)
    assert adamw.whole_ratio == 1 and adamw.step_ratio == 1
    assert adamw.trainable == num_params and cmd.trainable < num_params  # two matrices projected
    assert 0 < cmd.state_bytes < adamw.state_bytes
    assert abs(galore.state_bytes - cmd.state_bytes) <= 0.25 * cmd.state_bytes  # matched on state bytes
    assert galore.rank >= 1 and lora.rank >= 1
    adapters = lora.rank * (64 + 32 + 32 + 32)  # fc1 and fc2 adapted; the head (330 numbers) in full
    assert lora.trainable == adapters + 330
    assert abs(adapters - cmd.trainable) <= (64 + 32 + 32 + 32) / 2  # matched on trainable numbers


def test_step_cost_writes_both_columns_and_the_backend(monkeypatch):
    from benchmarks import step_cost

    tiny = step_cost.Model("tiny MLP", lambda: step_cost.digits_shapes(hidden=16), _tiny_workload)
    monkeypatch.setitem(step_cost.MODELS, "tiny", tiny)
    written = {}
    monkeypatch.setattr(step_cost, "write_section", lambda name, body: written.update({name: body}))
    threads = torch.get_num_threads()
    try:
        results = step_cost.main(["--models", "tiny", "--repeats", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    body = written["step"]
    assert "Command: `python -m benchmarks.step_cost --repeats 2 --models tiny --threads 1`" in body
    assert f"torch {torch.__version__}, cpu, 1 threads" in body
    assert "not measurements" in body  # no GPU rows: the page's GPU figures are the roofline's estimates
    rows, (num_params, whole) = results["tiny"]
    assert [name for name, *_ in rows] == list(step_cost.CONTENDERS)
    assert [r.method for r in whole] == list(step_cost.WHOLE_METHODS)
    summary = next(line for line in body.splitlines() if line.startswith("| tiny MLP |"))
    ratios = [float(v) for cell in summary.split("|")[3:6] for v in cell.split("/")]
    assert len(ratios) == 6 and all(math.isfinite(v) and v > 0 for v in ratios)
    for method in step_cost.WHOLE_METHODS:
        assert any(line.startswith(f"| {method} |") and line.count("|") == 9 for line in body.splitlines())


def test_the_cost_suite_times_the_mode_rows_beside_their_bases():
    from benchmarks import cost, step_cost

    _, rows = step_cost.measure(step_cost.digits_shapes(hidden=16), repeats=2, names=cost.MODE_ROWS)
    by_name = {name: (seconds, ratio, own) for name, seconds, ratio, own, _ in rows}
    assert list(by_name) == ["SGD momentum", "AdamW", *cost.MODE_ROWS]
    sgd_modes = by_name[cost.MODE_ROWS[0]]
    assert sgd_modes[2] == pytest.approx(sgd_modes[0] / by_name["SGD momentum"][0])


def test_harness_continues_every_method_from_one_switch(tmp_path):
    from benchmarks import harness

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the harness's workers (two threads on a busy 2-core machine crawl)
    try:
        payload = harness.main(["--quick", "--no-write", "--tasks", "digits_mlp", "mnist1d_gru", "--seeds", "1",
                                "--jobs", "1", "--methods", "full", "default", "modes", "galore", "apollo", "lora",
                                "--json", str(tmp_path / "h.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "h.json").read_text())["records"] == payload["records"]
    by_task = {task: {r["method"]: r for r in payload["records"] if r["task"] == task}
               for task in ("digits_mlp", "mnist1d_gru")}
    for rows in by_task.values():
        assert set(rows) == {"switch", "full", "default", "modes", "galore", "apollo", "lora"}
        assert not any("error" in r for r in rows.values())
        full, default = rows["full"], rows["default"]
        assert full["recovery_loss"] == 1 and full["recovery_acc"] == 1  # by construction
        assert rows["switch"]["val_loss"] > full["val_loss"]
        for name in ("default", "modes"):  # the CMD warm-up is the base run
            assert rows[name]["warmup_max_diff"] <= 1e-6
        assert rows["modes"]["reduction"] == "modes" and rows["modes"]["trainable"] <= 10
        assert default["trainable"] < full["trainable"]
        # GaLore's rank matched on state bytes: within a quarter of the default's
        assert abs(rows["galore"]["state_bytes"] - default["state_bytes"]) <= 0.25 * default["state_bytes"]
        assert rows["galore"]["state_bytes"] == rows["galore"]["galore_probe_bytes"]
        lora = rows["lora"]  # LoRA's rank matched on adapter count: within half a rank's adapters
        per_rank = lora["adapters"] / lora["rank"]
        assert lora["rank"] == 1 or abs(lora["adapters"] - default["trainable"]) <= per_rank / 2
        assert lora["trainable"] > lora["adapters"]  # the classifier head trains in full
    assert "skipped" in by_task["digits_mlp"]["apollo"]  # an AdamW optimizer, on an SGD task
    assert by_task["mnist1d_gru"]["apollo"]["rank"] == by_task["mnist1d_gru"]["galore"]["rank"]


def test_harness_held_out_tasks_are_apart_from_the_development_set_and_learn(tmp_path):
    from benchmarks import harness, harness_tasks

    assert len(harness.HELD_OUT_TASKS) == 3 and not set(harness.HELD_OUT_TASKS) & set(harness.DEFAULT_TASKS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = harness.main(["--held-out", "--quick", "--no-write", "--seeds", "1", "--jobs", "1",
                                "--methods", "full", "default", "--json", str(tmp_path / "held_out.json")])
    finally:
        torch.set_num_threads(threads)
    assert payload["meta"]["command"].startswith("python -m benchmarks.harness --held-out --quick")
    rows = {(r["task"], r["method"]): r for r in payload["records"]}
    assert {task for task, _ in rows} == set(harness.HELD_OUT_TASKS)
    for name in harness.HELD_OUT_TASKS:
        task = harness.task_of(name, quick=True)
        untrained = harness_tasks.evaluate(harness_tasks.build(task, 0), harness_tasks.load(task.data))["val_loss"]
        switch, full, default = rows[name, "switch"], rows[name, "full"], rows[name, "default"]
        assert not any("error" in r for r in (switch, full, default))
        assert 50_000 <= full["parameters"] <= 2_000_000
        # finite (evaluate gives None otherwise) and below the untrained model's after 20 and 40 steps
        assert switch["val_loss"] < untrained and full["val_loss"] < untrained, name
        assert default["val_loss"] is not None and default["warmup_max_diff"] <= 1e-6
        assert default["state_bytes"] < full["state_bytes"]


def test_harness_held_out_section_leaves_the_harness_section_alone(tmp_path):
    from benchmarks import harness

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n{harness.HEADING}\n\n{harness.BEGIN}\nthe harness\n{harness.END}\n\nnotes\n")
    for body in ("first", "second"):
        harness.write_doc(f"held-out {body}", doc, harness.HELD_OUT)
    text = doc.read_text()
    assert text.startswith(f"# B\n\n{harness.HEADING}\n\n{harness.BEGIN}\nthe harness\n{harness.END}\n\nnotes\n")
    assert text.count(harness.HELD_OUT.heading) == 1 and "held-out second" in text and "held-out first" not in text


def test_base_rate_choice_takes_the_lowest_loss_and_never_a_rate_that_diverged():
    from benchmarks import base_rates

    rows = [dict(task="t", scale=s, lr=0.1 * s, seed=seed, val_loss=loss)
            for s, losses in {0.3: (0.9, 0.8), 1.0: (0.5, 0.6), 3.0: (0.2, None), 10.0: (0.7, 0.7), 30.0: (1.0, 1.0)}
            .items() for seed, loss in enumerate(losses)]
    assert base_rates.choose(rows) == {"t": 0.1}  # x3 is lower on seed 0 but diverged on seed 1


def test_a_tuned_rate_reaches_every_run_of_the_task_and_leaves_the_others_written():
    from benchmarks import harness, harness_tasks

    rates = {"digits_mlp": 0.123}
    tuned = harness.task_of("digits_mlp", quick=True, rates=rates)
    assert tuned.base_kwargs == {**harness_tasks.TASKS["digits_mlp"].base_kwargs, "lr": 0.123}
    assert harness.task_of("mnist1d_gru", quick=False, rates=rates) is harness_tasks.TASKS["mnist1d_gru"]
    assert harness_tasks.TASKS["digits_mlp"].base_kwargs["lr"] == 0.01  # the written task is not changed
    records = [dict(task="digits_mlp", method="switch", seed=0, val_loss=1.0, val_acc=0.5)]
    assert "'lr': 0.123" in harness.task_table("digits_mlp", records, quick=True, rates=rates)
    written = {n: t.base_kwargs["lr"] for n, t in harness_tasks.TASKS.items()}
    assert harness.retuned({**written, "char_lm": 1.0, "stdlib_lstm": 2.0}) == ["char_lm", "stdlib_lstm"]


def test_paired_seeds_take_each_peers_better_rate_and_call_a_gap_only_outside_the_interval():
    from benchmarks import paired

    def rows(method, losses):
        return [{"task": "t", "method": method, "seed": s, "val_loss": v} for s, v in enumerate(losses)]

    records = [*rows("default", [1.0, 1.1, 0.9, 1.05]), *rows("galore", [0.9, 1.0, 0.8, 0.95]),
               *rows("galore_lr4", [1.5, 1.6, 1.4, 1.55]), *rows("lora", [0.1, 0.1, 0.1, float("nan")]),
               *rows("lora_lr10", [1.2, 0.9, 1.3, 0.8])]
    mine, best, diffs = paired.differences(records, "t", ("galore", "galore_lr4"))
    assert (mine, best) == ("default", "galore") and diffs == pytest.approx([0.1, 0.1, 0.1, 0.1])
    mine, best, diffs = paired.differences(records, "t", ("lora", "lora_lr10"))  # a seed of lora diverged: out
    assert best == "lora_lr10"
    mean, low, high = paired.interval(diffs)
    assert low < 0 < high and mean == pytest.approx(-0.0375)
    assert paired.verdict(low, high) == "within noise"
    assert paired.verdict(0.01, 0.2) == "peer ahead" and paired.verdict(-0.2, -0.01) == "CMD ahead"
    assert paired.differences(records, "t", ("apollo", "apollo_lr4")) is None
    # the default given two rates as well: its better one is taken
    records += rows("default_lr025", [0.8, 0.9, 0.7, 0.85])
    mine, best, diffs = paired.differences(records, "t", ("galore", "galore_lr4"), ("default", "default_lr025"))
    assert mine == "default_lr025" and diffs == pytest.approx([-0.1, -0.1, -0.1, -0.1])


def test_the_step_scale_table_calls_a_scale_behind_only_outside_its_interval_and_where_it_diverged():
    from benchmarks import step_scale

    def rows(schedule, task, method, losses):
        return [{"schedule": schedule, "task": task, "method": method, "seed": s, "val_loss": v}
                for s, v in enumerate(losses)]

    records = [*rows("constant", "t", "lowrank_scale1", [1.0, 1.1, 0.9]),
               *rows("constant", "t", "lowrank_scale2", [1.2, 1.3, 1.1]),  # behind on every seed
               *rows("constant", "t", "lowrank_scale4", [1.0, None, 0.9]),  # a seed diverged
               *rows("constant", "t", "default", [1.0, 1.1, 0.9]),
               *rows("linear", "t", "lowrank_scale1", [1.0, 1.1, 0.9]),
               *rows("linear", "t", "lowrank_scale2", [0.9, 1.2, 0.8]),  # within noise
               *rows("linear", "t", "lowrank_scale4", [0.8, 0.9, 0.7]),  # ahead
               *rows("linear", "t", "default", [0.8, 0.9, 0.7])]
    assert step_scale.differences(records, "constant", "t", "lowrank_scale2") == pytest.approx([0.2, 0.2, 0.2])
    text = step_scale.table(records)
    assert ("| constant | t | 3 | 1.0000 | +0.2000 [+0.2000, +0.2000], 0/3 | diverged on 1 of 3 seeds | "
            "+0.0000 [+0.0000, +0.0000], 0/3 |") in text
    assert "| linear | t | 3 | 1.0000 |" in text and "-0.2000 [-0.2000, -0.2000], 3/3" in text
    assert "step_scale=2 uncapped behind step_scale=1 (interval above 0) on 1: t (constant)" in text
    assert "step_scale=4 uncapped behind step_scale=1 (interval above 0) on 1: t (constant)" in text
    assert "the default (step_scale=4, capped at the peak) behind step_scale=1 (interval above 0) on 0: none" in text


def test_a_linear_schedule_reaches_every_row_from_its_own_peak_and_a_constant_one_changes_nothing():
    from benchmarks import harness, harness_tasks

    task = harness.task_of("digits_mlp", quick=True, schedule="linear")
    assert (task.schedule, harness_tasks.TASKS["digits_mlp"].schedule) == ("linear", "constant")
    assert [task.lr_factor(s) for s in (0, 10, 40)] == [1.0, 0.75, 0.0]
    assert harness.task_of("digits_mlp", quick=True).lr_factor(39) == 1.0
    data = harness_tasks.load(task.data)
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    model = harness_tasks.build(task, 0)
    optimizer = Recording(model.parameters(), lr=0.2)
    harness_tasks.train(model, optimizer, data, 0, 0, 20, 8, task.lr_factor)
    harness_tasks.set_peak_rate(optimizer, 0.25)  # a row's rate scaled at the switch: the peak is scaled
    harness_tasks.train(model, optimizer, data, 0, 20, 40, 8, task.lr_factor)
    assert [lrs[0] for lrs in seen] == pytest.approx([0.2 * task.lr_factor(s) for s in range(20)]
                                                     + [0.05 * task.lr_factor(s) for s in range(20, 40)])
    late = Recording(model.parameters(), lr=0.4)  # a peer built at the switch decays from its own peak
    harness_tasks.train(model, late, data, 0, 20, 21, 8, task.lr_factor)
    assert seen[-1] == pytest.approx([0.4 * 0.5])


def test_step_lengths_scale_with_the_rate_and_are_measured_from_one_switch(tmp_path):
    """On the quick GRU task every method's first step is measured from the same switch: a peer at lr x4 moves
    exactly four times as far as at x1 (same state, same gradient, Adam's step linear in the rate), and the table
    gives the default 1.00 of itself."""
    from benchmarks import harness_tasks as tasks
    from benchmarks import step_length

    rows = step_length.measure(tasks.quick(tasks.TASKS["mnist1d_gru"]), 0, 2, tmp_path)
    assert set(rows) == {"full", "default", "galore", "galore_lr4", "apollo", "apollo_lr4"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in rows.values())
    for family in ("galore", "apollo"):
        assert rows[f"{family}_lr4"][0] == pytest.approx(4 * rows[family][0], rel=1e-3)
    assert "| default | 1.00 | 1.00 | 1.00 |" in step_length.table([rows])


def test_rate_split_rows_scale_one_part_of_the_model_from_the_base_runs_switch():
    """``default_proj4`` and ``default_free4`` run the default in two parameter groups (its warm-up is still the
    base run's) and scale only one group's peak at the switch; the section pairs every row with the peer at x4."""
    from benchmarks import harness, harness_tasks, rate_split

    model = harness_tasks.build(harness_tasks.quick(harness_tasks.TASKS["mnist1d_gru"]), 0)
    matrices = harness.projectable(model)
    assert matrices and all(min(p.shape[0], p[0].numel()) > 16 for p in matrices)
    assert any(p.ndim == 1 for p in model.parameters()) and not any(p.ndim == 1 for p in matrices)
    optimizer = torch.optim.SGD([{"params": matrices}, {"params": [model.hh.bias]}], lr=0.1)
    harness_tasks.set_peak_rate(optimizer, harness.CMD_GROUP_SCALE["default_free4"])
    rates = [g[key] for g in optimizer.param_groups for key in ("lr", "initial_lr")]
    assert rates == pytest.approx([0.1, 0.1, 0.4, 0.4])
    with pytest.raises(ValueError):
        harness_tasks.set_peak_rate(optimizer, (1.0, 2.0, 3.0))  # one factor per group

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = harness.measure(["mnist1d_gru"], ["default", "default_proj4", "default_free4"], 1, 1, quick=True)
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in records}
    for name in ("default_proj4", "default_free4"):
        assert rows[name]["warmup_max_diff"] <= 1e-6 and rows[name]["trainable"] == rows["default"]["trainable"]
        assert rows[name]["val_loss"] != rows["default"]["val_loss"]
    synthetic = [dict(task="t", method=m, seed=s, val_loss=v) for m, losses in
                 {"apollo_lr4": [1.0, 1.1, 1.2], "full": [1.0, 1.0, 1.0], "default": [1.1, 1.2, 1.3],
                  "default_proj4": [0.9, 1.0, 1.0]}.items() for s, v in enumerate(losses)]
    text = rate_split.table(synthetic, "t")
    assert ("| default | 3 | 1.2000 | +0.1000 [+0.1000, +0.1000], 0/3, apollo_lr4 ahead | "
            "+0.2000 [-0.0484, +0.4484], 0/3, within noise |") in text
    assert "| default_proj4 | 3 | 0.9667 | -0.1333 [-0.2768, +0.0101], 3/3, within noise |" in text
    assert "| apollo_lr4 | 3 | 1.1000 | - |" in text and "| full | 3 | 1.0000 |" in text
