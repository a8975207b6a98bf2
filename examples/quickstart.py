"""The three lines of cmd-optim in a complete training loop (scikit-learn's bundled digits).

    python examples/quickstart.py
"""
import torch
from sklearn.datasets import load_digits
from torch import nn

from cmd_optim import CMDOptimizer

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
# the default reduction; the design card's line, modes=10, trains the paper's 10 mode coefficients instead
opt = CMDOptimizer(model, base=torch.optim.SGD, switch_after=300, lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)  # schedulers work in both phases

for step in range(1000):
    batch = torch.randint(0, len(x_train), (64,))
    loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
    opt.zero_grad()
    loss.backward()
    opt.step()
    scheduler.step()
    if step % 100 == 99:
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean()
        print(f"step {step + 1:4d}  phase {opt.phase:8s}  trainable numbers {opt.trainable_dims:6d}  "
              f"optimizer state {opt.state_bytes:7d} B  loss {loss.item():.3f}  test accuracy {accuracy:.3f}")

torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "/tmp/cmd_quickstart.pt")
