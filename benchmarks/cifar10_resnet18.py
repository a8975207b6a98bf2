"""The paper's CIFAR-10 setting: ResNet-18, SGD lr 0.05 momentum 0.9, 150 epochs, no scheduler;
CMD with M = 10, K = 1000 and a 20-epoch warm-up (one snapshot per epoch); plain SGD alongside.

    python -m benchmarks.cifar10_resnet18 --data ~/data/cifar10            # torchvision downloads it there
    python -m benchmarks.cifar10_resnet18 --fake --epochs 3 --warmup-epochs 2   # random tensors of CIFAR's shape

Needs torchvision (the ``vision`` extra). Prints one JSON record per method.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from cmd_optim import CMDOptimizer
from cmd_optim.optim import optimizer_state_bytes


def loaders(args):
    import torchvision
    from torchvision import transforms

    if args.fake:
        train, test = fake_cifar(args.fake_size, 0), fake_cifar(args.fake_size // 2, 1)
    else:
        normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                      transforms.ToTensor(), normalize])
        train = torchvision.datasets.CIFAR10(args.data, train=True, download=True, transform=augment)
        test = torchvision.datasets.CIFAR10(args.data, train=False, download=True,
                                            transform=transforms.Compose([transforms.ToTensor(), normalize]))
    gen = torch.Generator().manual_seed(args.seed)
    return (torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, generator=gen, drop_last=True),
            torch.utils.data.DataLoader(test, batch_size=256))


def fake_cifar(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` images of CIFAR-10's shape (3, 32, 32): noise plus one of 10 fixed class patterns (learnable, so
    that a smoke run can show that training works), labels int64 in [0, 10)."""
    patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=gen) + patterns[labels], labels)


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 first convolution, no max-pool)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train()
    return correct / total


def run(method: str, args, train, test, device) -> dict:
    torch.manual_seed(args.seed)
    model = resnet18().to(device)
    steps_per_epoch = len(train)
    if method == "SGD":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        optimizer = CMDOptimizer(model, base=torch.optim.SGD, modes=10, samples=1000, seed=args.seed,
                                 switch_after=args.warmup_epochs * steps_per_epoch, snapshot_every=steps_per_epoch,
                                 lr=args.lr, momentum=0.9, reduction="modes")
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    reached = optimizer.phase if isinstance(optimizer, CMDOptimizer) else "full"
    dims = optimizer.trainable_dims if isinstance(optimizer, CMDOptimizer) else sum(p.numel() for p in model.parameters())
    return dict(task="cifar10-resnet18" + ("-fake" if args.fake else ""), method=method, seed=args.seed,
                test_acc=accuracy(model, test, device), trainable_dims=dims, wall_s=time.perf_counter() - start,
                optimizer_bytes=optimizer_state_bytes(optimizer), phase=reached)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/cifar10")
    parser.add_argument("--fake", action="store_true", help="noisy class patterns of CIFAR-10's shape (no download)")
    parser.add_argument("--fake-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--warmup-epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    train, test = loaders(args)
    records = [run(method, args, train, test, torch.device(args.device)) for method in ("SGD", "CMD(SGD)")]
    for record in records:
        print(json.dumps(record))
    return records


if __name__ == "__main__":
    main()
