import pytest
import torch

from bench import data, models
from bench.training import TrainConfig, Trainer
from protectors.core.base import PluginContext

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def digits():
    return data.load("digits", seed=0)


@pytest.fixture(scope="session")
def lenet_factory(digits):
    i = digits.info
    return models.factory("lenet5", i.in_channels, i.image_size, i.num_classes, seed=0)


@pytest.fixture(scope="session")
def trainer():
    return Trainer(TrainConfig(epochs=40, batch_size=32, lr=0.03), progress=False)


@pytest.fixture(scope="session")
def clean_lenet(digits, lenet_factory, trainer):
    torch.manual_seed(0)
    return trainer.fit(lenet_factory(), data.BatchLoader(digits.train_x, digits.train_y, 32, 0))


def make_context(splits, factory, trainer, epochs=40, seed=0, secret_seed=12345):
    return PluginContext(model_factory=factory, trainer=trainer,
                         train_loader=data.BatchLoader(splits.train_x, splits.train_y, 32, seed + 1),
                         calib_x=splits.train_x[:200], calib_y=splits.train_y[:200],
                         num_classes=splits.info.num_classes, epochs=epochs, lock_sites=factory.card.lock_sites,
                         device=torch.device("cpu"), seed=seed, secret_seed=secret_seed,
                         example_input=splits.train_x[:1])


@pytest.fixture(scope="session")
def ctx(digits, lenet_factory, trainer):
    return make_context(digits, lenet_factory, trainer)


@pytest.fixture(scope="session")
def key():
    return bytes(range(32))


@pytest.fixture(scope="session")
def other_key():
    return bytes(range(1, 33))


@pytest.fixture(scope="session")
def edgepro_artifact(clean_lenet, ctx, key):
    """A real EdgePro lock training on digits (LeNet-5, 40 epochs: about 5 s on 2 cores)."""
    import protectors

    torch.manual_seed(0)
    return protectors.get("edgepro").protect(clean_lenet, ctx, key)
