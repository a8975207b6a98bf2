"""Run under torchrun by tests/integrations/test_ddp.py: a Trainer with CMDOptimizer on 2 gloo processes.

    torchrun --nproc_per_node 2 tests/integrations/ddp_trainer_run.py OUTPUT [CHECKPOINT]
    torchrun --nproc_per_node 2 tests/integrations/ddp_trainer_run.py OUTPUT lowrank [CHECKPOINT]

The first trains with the mode reduction (and resumes from CHECKPOINT); ``lowrank`` trains with the default
reduction, refreshing its bases every 5 steps (and resumes from CHECKPOINT, the hook's state with it), and also
saves the numbers its hook should send per step.
"""
import os
import sys

import torch
import torch.distributed as dist
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository: benchmarks, tests

from benchmarks import datasets  # noqa: E402
from benchmarks.processes import leave_process_group  # noqa: E402
from cmd_optim import CMDOptimizer, LowRank  # noqa: E402
from cmd_optim.integrations.hf import CMDCallback  # noqa: E402
from tests._helpers import Words, tiny_bert_config  # noqa: E402


class BytesPerStep(TrainerCallback):
    """What the CMD hook sent in each optimizer step."""

    def __init__(self, cmd_callback):
        self.cmd_callback, self.sent, self.last = cmd_callback, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        total = self.cmd_callback.hook_state.bytes_sent
        self.sent.append(total - self.last)
        self.last = total


def low_rank_numbers(optimizer, model) -> int:
    """What the low-rank hook sends per step: r + D per projected matrix, m + n per matrix trained in full
    where that is fewer numbers than it, the rest whole."""
    phase, total = optimizer.reduced_phase, 0
    for p in model.parameters():
        m, n = (p.shape[0], p.numel() // p.shape[0]) if p.ndim >= 2 else (1, p.numel())
        index = phase.subspace_of(p)
        if index is not None:
            total += sum(phase.map.core_shape(index)) if min(phase.map.core_shape(index)) > 1 else p.numel()
        else:
            total += m + n if p.ndim >= 2 and m + n < m * n else p.numel()
    return total


def main(output, checkpoint=None, resumed=None):
    lowrank = checkpoint == "lowrank"
    checkpoint = resumed if lowrank else checkpoint
    train_x, train_y, _, _ = datasets.vader_sentiment(seed=0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    if lowrank:
        optimizer = CMDOptimizer(model, base=torch.optim.AdamW, switch_after=20, lr=3e-3,
                                 reduction=LowRank(refresh_every=5))
    else:
        optimizer = CMDOptimizer(model, base=torch.optim.AdamW, modes=8, switch_after=20, snapshot_every=5,
                                 samples=500, lr=3e-3, reduction="modes")
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=16, max_steps=40, save_strategy="steps",
                             save_steps=25, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             ddp_backend="gloo", dataloader_num_workers=0, logging_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=Words(train_x[:1000], train_y[:1000]),
                      optimizers=(optimizer, None))
    recorder = BytesPerStep(CMDCallback.install(trainer, resume_from_checkpoint=checkpoint if lowrank else None))
    # (install registers the CMD hook on the Trainer's DDP wrapper)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=checkpoint)
    rank = dist.get_rank()
    result = {"params": [p.detach() for p in model.parameters()], "phase": optimizer.phase,
              "steps": optimizer.steps_taken, "sent": recorder.sent,
              "num_params": sum(p.numel() for p in model.parameters())}
    if lowrank:
        result.update(refreshes=optimizer.reduced_phase.refreshes, numbers=low_rank_numbers(optimizer, model))
    else:
        result["modes"] = optimizer.switch_report["modes"]
    torch.save(result, os.path.join(output, f"final-rank{rank}.pt"))
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
