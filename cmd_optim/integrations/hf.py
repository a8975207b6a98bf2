"""Hugging Face ``Trainer`` integration (needs the ``hf`` extra: transformers, accelerate).

Two ways to hand a CMDOptimizer to a Trainer, both driven by the Trainer's own LR scheduler, gradient
accumulation, clipping, mixed precision and checkpoints::

    Trainer(model=model, args=args, optimizers=(CMDOptimizer(model, base=torch.optim.AdamW, lr=5e-5), None))
    Trainer(model=model, args=args, optimizer_cls_and_kwargs=trainer_optimizer(model, lr=5e-5, weight_decay=0.01))

and :class:`CMDCallback` puts what the optimizer is doing into the Trainer's logs. :class:`OnlineCMDCallback`
fits the paper's Online CMD model beside any Trainer run, and evaluates and saves it with the Trainer's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import get_parameter_names
from transformers.utils import find_labels

from ..core._checks import check_int
from ..optim import CMDOptimizer, find_cmd_optimizer
from .ddp import register_cmd_hook

__all__ = ["CMDCallback", "OnlineCMDCallback", "trainer_optimizer"]

#: Parameters without weight decay, as the Trainer groups them: LayerNorm layers, and names with a bias or a norm.
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def trainer_optimizer(model: torch.nn.Module, *, weight_decay: float = 0.0,
                      base: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs) -> tuple[type, dict]:
    """``optimizer_cls_and_kwargs`` for a ``Trainer``: a CMDOptimizer over ``model``, AdamW by default (the
    Trainer's own optimizer family; note that torch's AdamW defaults to weight decay 0.01 where the
    Trainer's ``weight_decay`` argument defaults to 0, so set ``weight_decay`` here as in the Trainer).

    The parameters are grouped as the Trainer groups them (``weight_decay`` on all but biases and
    normalisation weights) and keep their names, so ``keep_free`` patterns work. Two groups with the
    mode reduction mean two sets of mode coefficients. The groups travel in the kwargs key ``"model"``,
    which the Trainer pops and passes as the optimizer's first argument; the returned dict is therefore
    good for one Trainer. ``kwargs`` go to :class:`CMDOptimizer` (``modes``, ``switch_after``, ``lr``, ...).
    """
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_NAMES))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(name, p) for name, p in named if name in decay], "weight_decay": weight_decay},
        {"params": [(name, p) for name, p in named if name not in decay], "weight_decay": 0.0},
    ]
    return CMDOptimizer, {"model": [group for group in groups if group["params"]], "base": base, **kwargs}


_DECOMPOSITION_KEYS = ("modes", "decomposed_params", "snapshots", "relative_error", "explained_variance")


def _checkpoint_folder(args, state) -> Path:
    """The folder the Trainer writes (or, resuming with ``resume_from_checkpoint=True``, reads) at this step."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class CMDCallback(TrainerCallback):
    """Adds a CMDOptimizer's state to every training log of the Trainer.

    Keys: ``cmd/reduced`` (0 in the warm-up, 1 after), ``cmd/trainable_dims``, ``cmd/skipped_steps``,
    ``cmd/limited_steps``; and once, at the first log after the switch (a log is requested at the
    switch step), ``cmd/switch_step`` and, for the reductions that decompose the warm-up (modes, gradual),
    ``cmd/modes``, ``cmd/decomposed_params``, ``cmd/snapshots``, ``cmd/relative_error`` (mean over the
    warm-up snapshots) and ``cmd/explained_variance``. They go into ``trainer.state.log_history`` too.

    Reporters (TensorBoard, W&B, ...) are callbacks that run in order; to have them see these keys,
    add the callback in front of them with :meth:`install`. Installed that way it also registers the
    CMD communication hook (:func:`cmd_optim.integrations.ddp.register_cmd_hook`) on the Trainer's own
    DistributedDataParallel wrapper under ``torchrun``; ``hook_state`` then counts the bytes sent, and each rank
    writes the hook's state (the low-rank phase's error feedback) to ``cmd_hook_rank<rank>.pt`` in every
    checkpoint folder and loads it on resume. A resumed Trainer does not tell callbacks which checkpoint it
    resumes from: pass the same folder as ``resume_from_checkpoint`` (otherwise the callback looks in
    ``output_dir/checkpoint-<step>``, and warns if a low-rank phase resumes without the file there).
    """

    def __init__(self, resume_from_checkpoint=None) -> None:
        self._switch_logged = False
        self._trainer = None
        self.hook_state = None
        self.resume_from_checkpoint = resume_from_checkpoint

    @classmethod
    def install(cls, trainer, resume_from_checkpoint=None) -> CMDCallback:
        """Put a new CMDCallback first among ``trainer``'s callbacks, so every reporter sees its keys, and
        let it register the DDP communication hook on the Trainer's wrapper when there is one (its state
        resumed from ``resume_from_checkpoint``, the folder given to ``trainer.train``)."""
        callback = cls(resume_from_checkpoint)
        callback._trainer = trainer
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        cmd = find_cmd_optimizer(optimizer)
        if cmd is not None and cmd.switch_report is not None and cmd.switch_report["step"] < cmd.steps_taken:
            self._switch_logged = True  # resumed after the switch: the run that switched logged it
        wrapped = getattr(self._trainer, "model_wrapped", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and self.hook_state is None:
            cmd = find_cmd_optimizer(optimizer)
            if cmd is not None and not cmd.mode_exchange.hooked:
                self.hook_state = register_cmd_hook(wrapped, cmd)
                if state.global_step > 0:
                    self._resume_hook(args, state)
        elif self._trainer is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            warnings.warn("CMDCallback() passed to the Trainer cannot reach its DDP wrapper; use "
                          "CMDCallback.install(trainer) to register the CMD communication hook (without it, or "
                          "process_group= given to the CMDOptimizer, each rank switches alone)", stacklevel=2)
        return control

    def _hook_file(self, folder) -> Path:
        return Path(folder) / f"cmd_hook_rank{torch.distributed.get_rank()}.pt"

    def _resume_hook(self, args, state) -> None:
        folder = self.resume_from_checkpoint or _checkpoint_folder(args, state)
        saved = self._hook_file(folder)
        if saved.exists():
            self.hook_state.load_state_dict(torch.load(saved, weights_only=True))
        elif self.resume_from_checkpoint is not None:
            raise FileNotFoundError(f"{saved} does not exist: the checkpoint holds no CMD hook state")
        elif self.hook_state.exchange.low_rank:
            warnings.warn(f"resuming at step {state.global_step} without {saved}: the CMD hook's error feedback "
                          "starts afresh; pass resume_from_checkpoint= to CMDCallback.install", stacklevel=2)

    def on_save(self, args, state, control, **kwargs):
        if self.hook_state is not None:
            saved = self._hook_file(_checkpoint_folder(args, state))
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.hook_state.state_dict(), saved)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        cmd = find_cmd_optimizer(optimizer)
        if cmd is not None and cmd.switch_report is not None and not self._switch_logged:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        cmd = find_cmd_optimizer(optimizer)
        if cmd is None or logs is None or any(key.startswith("eval_") for key in logs):
            return control
        metrics = {
            "cmd/reduced": int(cmd.phase == "reduced"),
            "cmd/trainable_dims": cmd.trainable_dims,
            "cmd/skipped_steps": cmd.skipped_steps,
            "cmd/limited_steps": cmd.limited_steps,
        }
        if cmd.switch_report is not None and not self._switch_logged:
            report = cmd.switch_report
            metrics["cmd/switch_step"] = report["step"]
            metrics.update({f"cmd/{key}": report[key] for key in _DECOMPOSITION_KEYS if key in report})
            self._switch_logged = True
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        return control

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        cmd = find_cmd_optimizer(optimizer)
        if cmd is not None:
            cmd.training_ended()
        return control


class OnlineCMDCallback(TrainerCallback):
    """Fits an :class:`~cmd_optim.OnlineCMD` model beside the Trainer's and evaluates and saves it with it.

    Every ``every`` optimizer steps the CMD model takes a snapshot of the Trainer's model. At each
    evaluation it is run on the evaluation set too: ``eval_cmd_loss`` and, for a model with one label,
    ``eval_cmd_accuracy`` join the metrics and ``log_history``. The labels are the Trainer's
    (``args.label_names``, or the model's own); the accuracy is per example for classifiers, per token
    for token-level labels and per next token for causal LMs, labels -100 not counted. At each checkpoint
    its state_dict is written to ``online_cmd.pt`` in the checkpoint folder. A resumed Trainer does not tell
    callbacks which checkpoint it resumes from: pass the same folder as ``resume_from_checkpoint``
    (otherwise the callback looks for ``output_dir/checkpoint-<step>`` and warns if the file is not there).
    """

    FILE = "online_cmd.pt"

    def __init__(self, cmd_model, every: int = 1, resume_from_checkpoint=None) -> None:
        self.cmd_model = cmd_model
        self.every = check_int("every", every, low=1)
        self.resume_from_checkpoint = resume_from_checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return control
        folder = self.resume_from_checkpoint or _checkpoint_folder(args, state)
        saved = Path(folder) / self.FILE
        if saved.exists():
            self.cmd_model.load_state_dict(torch.load(saved, weights_only=True))
        elif self.resume_from_checkpoint is not None:
            raise FileNotFoundError(f"{saved} does not exist: the checkpoint holds no Online CMD state")
        else:
            warnings.warn(f"resuming at step {state.global_step} without {saved}: the Online CMD model starts "
                          "afresh; pass resume_from_checkpoint= to OnlineCMDCallback", stacklevel=2)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.cmd_model.update_parameters(model)
        return control

    @torch.no_grad()
    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, model=None, **kwargs):
        if eval_dataloader is None or metrics is None:
            return control
        device = next(model.parameters()).device
        names = args.label_names if args.label_names is not None else find_labels(type(model))
        shift = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self.cmd_model.to(device).eval()
        loss, examples, correct, counted = 0.0, 0, 0, 0
        for batch in eval_dataloader:
            batch = {key: value.to(device) for key, value in batch.items()}
            output = self.cmd_model(**batch)
            size = len(next(iter(batch.values())))
            loss += float(output.loss) * size
            examples += size
            logits = getattr(output, "logits", None)
            if len(names) == 1 and logits is not None and names[0] in batch:
                hits, tokens = _hits(logits, batch[names[0]], shift)
                correct, counted = correct + hits, counted + tokens
        cmd_metrics = {"eval_cmd_loss": loss / max(examples, 1)}
        if counted:
            cmd_metrics["eval_cmd_accuracy"] = correct / counted
        metrics.update(cmd_metrics)
        state.log_history.append({**cmd_metrics, "step": state.global_step})
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = _checkpoint_folder(args, state)
        if folder.is_dir():
            torch.save(self.cmd_model.state_dict(), folder / self.FILE)
        return control


def _hits(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[int, int]:
    """Correct predictions and counted labels (not -100); ``shift``: position t predicts label t + 1 (a causal LM)."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if logits.shape[:-1] != labels.shape or labels.is_floating_point():
        return 0, 0
    counted = labels != -100
    return int((logits.argmax(-1) == labels)[counted].sum()), int(counted.sum())
