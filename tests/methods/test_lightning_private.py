"""The private Lightning names this project relies on still exist, with the signature it calls them with.

A Lightning upgrade that renames or changes one fails here, naming it, instead of somewhere deep in a fit.
"""

import importlib
import inspect

import pytest
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.strategies import DDPStrategy

from lightning_rec.methods.ema.callback import LIGHTNING_PRIVATE
from lightning_rec.methods.topk.lightning_private import PRIVATE_NAMES


@pytest.mark.parametrize("module, name, params", PRIVATE_NAMES, ids=[n for _, n, _ in PRIVATE_NAMES])
def test_each_private_name_top_k_uses_exists_with_its_signature(module, name, params):
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"Lightning changed: {module}.{name} is gone (lightning_rec/methods/topk/lightning_private.py uses it)"
        obj = getattr(obj, part)
    got = list(inspect.signature(obj).parameters)
    assert got == params, f"Lightning changed: {module}.{name} now takes {got}, lightning_private.py calls it with {params}"


def test_ddp_wraps_the_module_only_in_configure_ddp():
    """Top-k averaging overrides the public configure_ddp to not wrap the module; a wrapper made anywhere else
    in DDPStrategy.setup would bring the per-step gradient all-reduce back."""
    src = inspect.getsource(DDPStrategy.setup)
    assert "self.configure_ddp()" in src and "_setup_model" not in src, (
        "Lightning changed: DDPStrategy.setup no longer wraps the module through configure_ddp alone; "
        "TopKAveragingStrategy.configure_ddp no longer keeps it unwrapped")


@pytest.mark.parametrize("attr", LIGHTNING_PRIVATE)
def test_each_weight_averaging_attribute_the_ema_callback_uses_exists(attr):
    cb = EMAWeightAveraging(decay=0.9)
    assert hasattr(cb, attr), f"Lightning changed: WeightAveraging.{attr} is gone (lightning_rec/methods/ema/callback.py uses it)"
