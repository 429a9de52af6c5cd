"""The training smoke test of the paper's model shapes on every device this machine has: the CPU always, the first
CUDA GPU where there is one (CI has none: those cases skip). It runs the suite's own trainer and EdgePro's lock
training, the two loops the `paper` config spends its time in, on a tiny fixed batch, and checks that they learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import models
from bench.training import TrainConfig, Trainer
from protectors.core import lock
from protectors.core.base import PluginContext
from protectors.edgepro import EdgeProProtector

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]
#: the paper's shapes: CIFAR-10 images for ResNet-18 (and MobileNetV2, the profiler's edge model), MNIST for LeNet-5
#: (ResNet-18 and MobileNetV2 train for seconds on 2 cores: slow; LeNet-5 stays in the fast loop)
SHAPES = [pytest.param("resnet18", 3, 32, marks=pytest.mark.slow),
          pytest.param("mobilenetv2", 3, 32, marks=pytest.mark.slow), ("lenet5", 1, 28)]


def _batch(channels: int, size: int):
    """One sample of each of 10 classes, each class a fixed random image plus noise: learnable in a few steps."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(10)
    templates = torch.randn(10, channels, size, size, generator=gen)
    return templates[y] + 0.3 * torch.randn(10, channels, size, size, generator=gen), y


@torch.no_grad()
def _loss(model, x, y) -> float:
    """Loss in training mode: after a few steps, batch-norm's running statistics do not describe the batch yet."""
    device = next(model.parameters()).device
    return torch.nn.functional.cross_entropy(model.train()(x.to(device)), y.to(device)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,channels,size", SHAPES)
def test_trainer_learns_a_batch_on_the_device(device, name, channels, size):
    x, y = _batch(channels, size)
    model = models.factory(name, channels, size, 10, seed=0)()
    before = _loss(model, x, y)
    trainer = Trainer(TrainConfig(epochs=5, batch_size=10, lr=0.1, weight_decay=0.0), device=device, progress=False)
    trained = trainer.fit(model, [(x, y)])
    assert {p.device.type for p in trained.parameters()} == {device}
    after = _loss(trained, x, y)
    assert np.isfinite(after) and after < before - 0.01, (before, after)  # LeNet-5 starts slowly: 2.31 -> 2.27
    # labels on the CPU, model on the device: evaluate moves each batch there and the predictions back
    assert 0.0 <= trainer.evaluate(trained, x, y) <= 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,channels,size", SHAPES[:2])
def test_edgepro_lock_training_runs_on_the_device(device, name, channels, size):
    """EdgePro's lock training on the device: the locked model comes back on the CPU, its sites unhooked, and the
    masked forward pass differs from the plain one (the lock acts)."""
    x, y = _batch(channels, size)
    factory = models.factory(name, channels, size, 10, seed=0)
    probe = factory()
    trainer = Trainer(TrainConfig(epochs=2, batch_size=10, lr=0.05), device=device, progress=False)
    ctx = PluginContext(model_factory=factory, trainer=trainer, train_loader=[(x, y)], calib_x=x, calib_y=y,
                        num_classes=10, epochs=2, lock_sites=factory.card.lock_sites, device=torch.device(device),
                        seed=0, secret_seed=1234, example_input=x[:1])
    protector = EdgeProProtector()
    password = protector.choose_password(probe.eval(), ctx)
    locked = protector.lock_train(password, ctx)
    assert {p.device.type for p in locked.parameters()} == {"cpu"}
    plain = locked(x)
    lock.install_fixed(locked, {s: password.mask(s) for s in password.neurons})
    assert torch.isfinite(plain).all() and not torch.allclose(locked(x), plain)
