"""Composing the Hydra config from the packaged ``conf/`` and turning Hydra's errors into one line."""

from __future__ import annotations

import re
from importlib import resources

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_rec.errors import ConfigError

CONFIG_MODULE = "lightning_rec.conf"


def data_label(name, path) -> str:
    """``${data_label:${data.name},${data.path}}``, the data part of a run's name: a dataset's name, or for
    ``data=file`` the file's name without folders and extensions (ratings.csv.gz -> ratings)."""
    if str(name) != "file" or not path:
        return str(name)
    base = re.split(r"[\\/]", str(path).rstrip("/\\"))[-1]
    stem = re.sub(r"(\.(gz|bz2|xz|zip|zst))?$", "", base, flags=re.I)
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", stem)
    return re.sub(r"[^\w.-]+", "_", stem) or str(name)


OmegaConf.register_new_resolver("data_label", data_label, replace=True)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def group_options(group: str) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``), without the shared ``base``."""
    try:
        folder = resources.files(CONFIG_MODULE).joinpath(group)
        names = [f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")]
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        return []
    return sorted(n for n in names if n != "base")


def _options_defining(key: str) -> list[str]:
    """``group=option`` choices whose file defines ``key`` (``callbacks.ema.decay`` -> ``callbacks=ema``)."""
    group, _, rest = key.lstrip("+").partition(".")
    found = []
    for option in group_options(group) if rest else []:
        try:
            conf = OmegaConf.create(resources.files(CONFIG_MODULE).joinpath(group, f"{option}.yaml").read_text())
        except Exception:
            continue
        if OmegaConf.select(conf, rest, default="__missing__") != "__missing__":
            found.append(f"{group}={option}")
    return found


def _close_keys(key: str, other_overrides: list[str]) -> list[str]:
    """Existing options spelled like ``key`` (``model.num_blokcs`` -> ``model.num_blocks``), from the config
    composed without it."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="config", overrides=other_overrides)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:
        return []
    finally:
        GlobalHydra.instance().clear()
    if not isinstance(node, DictConfig):
        return []
    names = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=2, cutoff=0.7)
    return [f"{parent}.{n}" if parent else n for n in names]


def _explain(e: Exception, overrides: list[str]) -> str:
    msg = _one_line(str(e))
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        owners = _options_defining(key)
        if owners:
            return (f"override '{key}': no such option in this config; it comes with "
                    f"{' or '.join(owners[:4])}: add that (e.g. `{owners[0]} {key}=...`)")
        near = _close_keys(key, [o for o in overrides if override_key(o) != key])
        if near:
            return (f"override '{key}': no such option; did you mean {' or '.join(near)}? (a key of your own needs "
                    f"'+{key}=...'; list the options with `python -m lightning_rec fit --cfg`)")
        return (f"override '{key}': no such option. Add new keys with '+{key}=...'; "
                "list the options with `python -m lightning_rec fit --cfg`")
    m = re.search(r"Could not find '([^/']+)/([^']+)'.*?Available options in '[^']+':(.*?)(?:$|Config search path)", msg)
    if m:
        group, choice = m.group(1), m.group(2)
        avail = [a for a in m.group(3).split() if a != "base"]  # base.yaml files hold shared defaults only
        return f"{group}={choice}: unknown {group}; available: {', '.join(avail)}"
    m = re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        return f"override '{m.group(1)}': no such option; list the options with `python -m lightning_rec fit --cfg`"
    if "mismatched input" in msg or "no viable alternative" in msg or "extraneous input" in msg:
        return f"could not parse the overrides {overrides}: {msg}; expected key=value"
    return msg


def load_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose ``conf/config.yaml`` with command-line overrides (``key=value``, ``group=option``);
    ``with_hydra`` keeps Hydra's own ``hydra`` node (for ``--cfg hydra|all``)."""
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]  # ~key deletes a key (Hydra)
    if bad:
        raise ConfigError(f"argument '{bad[0]}': expected key=value (e.g. model=nextitnet trainer.max_epochs=5)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
    except Exception as e:  # Hydra raises several exception types for bad overrides
        raise ConfigError(_explain(e, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def override_key(override: str) -> str:
    """The option an override sets: ``+callbacks.ema.decay=0.9`` -> ``callbacks.ema.decay``."""
    return override.split("=", 1)[0].lstrip("+~")


def to_plain(cfg) -> object:
    """Resolve interpolations and return plain containers (a plain value is returned as it is)."""
    if not OmegaConf.is_config(cfg):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise ConfigError(_one_line(str(e))) from None


def set_value(cfg: DictConfig, key: str, value) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)
