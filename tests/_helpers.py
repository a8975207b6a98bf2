"""Models, data and loops the tests share (imported as ``tests._helpers``)."""

import io

import torch
from torch import nn

LENGTH = 16


def mlp(seed=0, hidden=256):
    """The digits MLP 64-hidden-hidden-10."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def batch_index(step, size, count, seed=0):
    """The minibatch of ``step``: depends only on (seed, step), so runs can resume."""
    return torch.randint(0, size, (count,), generator=torch.Generator().manual_seed(seed * 100_003 + step))


def train(model, optimizer, data, steps, batch=64, seed=0, start=0, scheduler=None, on_step=None):
    """Minibatch cross-entropy training from step ``start`` to ``steps``."""
    x, y = data[0], data[1]
    for step in range(start, steps):
        idx = batch_index(step, len(x), batch, seed)
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


def full_batch_losses(model, optimizer, x, y, steps):
    """``steps`` optimizer steps with a full-batch cross-entropy closure (as LBFGS needs); their losses."""
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return [float(optimizer.step(closure).detach()) for _ in range(steps)]


def roundtrip(state):
    """``state`` through torch.save and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


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

