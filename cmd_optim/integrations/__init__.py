"""CMD with other libraries: ``ddp`` (a DistributedDataParallel communication hook) and ``hf`` (the Hugging
Face Trainer, needs the ``hf`` extra). Import the submodule you need; nothing is imported here."""

__all__: list[str] = []
