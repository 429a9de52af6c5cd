"""The one training loop: SGD with momentum and weight decay, cosine schedule, progress bar, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from protectors.core.base import Step


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the EdgePro code's defaults; its batch size for MNIST)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: period of the cosine schedule (the paper's code: 50 with 40 epochs); default: the number of epochs
    cosine_t_max: int | None = None

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("'epochs' and 'batch_size' must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"'lr' must be > 0, got {self.lr}")
        # SGD diverges (or, with torch, raises mid-run) outside these; catch them at the config, not after training.
        if not 0 <= self.momentum < 1:
            raise ValueError(f"'momentum' must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"'weight_decay' must be >= 0, got {self.weight_decay}")
        if self.cosine_t_max is not None and self.cosine_t_max < 1:
            raise ValueError(f"'cosine_t_max' must be >= 1 when given, got {self.cosine_t_max}")


class Trainer:
    """Trains and evaluates models on one device; satisfies :class:`protectors.core.base.Trainer`."""

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu", progress: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.progress = progress

    def fit(self, model: nn.Module, loader: Iterable, epochs: int | None = None, step: Step | None = None,
            desc: str = "train", lr: float | None = None) -> nn.Module:
        cfg = self.config
        epochs = epochs or cfg.epochs
        model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr or cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cosine_t_max or epochs)
        step = step or (lambda m, x, y: F.cross_entropy(m(x), y))
        total = epochs * len(loader) if hasattr(loader, "__len__") else None
        with tqdm(total=total, desc=desc, disable=not self.progress, leave=False, unit="batch") as bar:
            for _ in range(epochs):
                for x, y in loader:
                    x, y = x.to(self.device), y.to(self.device)
                    loss = step(model, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
        """Top-1 accuracy as a fraction."""
        was = model.training
        model.eval()
        correct = 0
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch].to(self.device))
            correct += (out.argmax(1).cpu() == y[i : i + batch]).sum().item()
        model.train(was)
        return correct / max(1, len(x))
