"""Hydra configs of lightning_rec (installed as ``lightning_rec.conf``)."""
