"""Ending the worker processes of torch.distributed runs (the DDP benchmark's, the distributed tests')."""
import os
import sys

import torch.distributed as dist

__all__ = ["leave_process_group"]


def leave_process_group() -> None:
    """End a worker process once its results are written: wait for every rank, destroy the process group,
    and exit without the interpreter's finalisation. gloo's C++ threads can abort a process while Python
    tears down (SIGABRT, "terminate called without an active exception", after the worker's last line; seen
    in CI, and pytorch/pytorch#179291), which would fail a run that succeeded. Only for processes of their
    own (spawned or torchrun), never for a test or benchmark's main process."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
