"""The training methods, one folder each: module code, callback and helpers together.

- :mod:`~lightning_rec.methods.stackrec`: grow depth by stacking blocks (callback and ``stack`` helpers)
- :mod:`~lightning_rec.methods.rocket`: booster + light net with a gradient-blocked hint loss
- :mod:`~lightning_rec.methods.optim_switch`: AdaShift and the SWATS switch to SGD
- :mod:`~lightning_rec.methods.ema`: exponential moving average of the weights
- :mod:`~lightning_rec.methods.topk`: top-k model averaging (topkSVRG) across workers
- :mod:`~lightning_rec.methods.federated`: federated training and distillation on Flower
"""
