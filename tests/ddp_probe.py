"""A callback used by DDP tests: each rank writes a fingerprint of its weights at the end of fit."""

import json
import os

import pytorch_lightning as pl
import torch


class WeightProbe(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        out = os.environ["PROBE_DIR"]
        state = {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()}
        grads = {n: p.grad is not None for n, p in pl_module.named_parameters()}
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"state": state, "num_blocks": len(pl_module.encoder.blocks), "grads": grads,
                       "ddp": isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)}, f)
