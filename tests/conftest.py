import pytest
import torch
from torch import nn

from cmd_optim import datasets


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits: (x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    return datasets.digits(seed=0)


def mlp(seed=0, hidden=256):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model, optimizer, data, steps, batch=64, seed=0, start=0, scheduler=None, on_step=None):
    """Minibatch cross-entropy training; batches depend only on (seed, step), so runs can resume."""
    x, y = data[0], data[1]
    for step in range(start, steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(seed * 100_003 + step))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step + 1)
    return model


@torch.no_grad()
def accuracy(model, data):
    return (model(data[2]).argmax(1) == data[3]).float().mean().item()


LENGTH = 16


class Words(torch.utils.data.Dataset):
    """Words as byte ids (0 pads, 257 starts), with their labels: input for a character-level BERT."""

    def __init__(self, words, labels):
        self.ids = torch.zeros(len(words), LENGTH, dtype=torch.long)
        for row, word in enumerate(words):
            codes = list(word.encode("utf-8"))[: LENGTH - 1]
            self.ids[row, 0] = 257
            self.ids[row, 1:len(codes) + 1] = torch.tensor(codes) + 1
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "attention_mask": (self.ids[index] > 0).long(),
                "labels": self.labels[index]}


def tiny_bert_config():
    """A 27K-parameter BERT over bytes, without dropout (runs compare bit for bit)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
