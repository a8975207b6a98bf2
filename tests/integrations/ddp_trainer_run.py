"""Run under torchrun by tests/test_distributed.py: a Trainer with CMDOptimizer on 2 gloo processes.

    torchrun --nproc_per_node 2 tests/ddp_trainer_run.py OUTPUT [CHECKPOINT]
"""
import os
import sys

import torch
import torch.distributed as dist
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository: benchmarks, tests

from benchmarks import datasets  # noqa: E402
from cmd_optim import CMDOptimizer  # noqa: E402
from tests._helpers import Words, tiny_bert_config  # noqa: E402


def main(output, checkpoint=None):
    train_x, train_y, _, _ = datasets.vader_sentiment(seed=0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    optimizer = CMDOptimizer(model, base=torch.optim.AdamW, modes=8, switch_after=20, snapshot_every=5,
                             samples=500, lr=3e-3)
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=16, max_steps=40, save_strategy="steps",
                             save_steps=25, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             ddp_backend="gloo", dataloader_num_workers=0, logging_steps=10)
    trainer = Trainer(model=model, args=args, train_dataset=Words(train_x[:1000], train_y[:1000]),
                      optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=checkpoint)
    rank = dist.get_rank()
    torch.save({"params": [p.detach() for p in model.parameters()], "phase": optimizer.phase,
                "steps": optimizer.steps_taken}, os.path.join(output, f"final-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
