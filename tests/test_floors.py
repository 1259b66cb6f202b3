"""The dependency floors pyproject.toml declares are true: with each floor version installed, every module
imports and a one-epoch fit runs. Marked ``floor`` (a network install, about a minute): ``pytest -m floor``,
run by CI once after the suite."""

import os
import re
import subprocess
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORED = ("pytorch-lightning", "torchmetrics", "hydra-core", "wandb")


def declared_floors(section: str = "dependencies") -> dict[str, str]:
    """``name -> floor`` of pyproject.toml's main dependencies, or of an extra (``section="fast"``)."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    deps = re.search(rf"^{section} = \[(.*?)\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^",<]*)', deps))


def floor_venv(tmp_path, pins: list[str]) -> str:
    """A venv over this interpreter's packages with ``pins`` installed in it; returns its python."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return py


def test_the_floors_are_declared():
    floors = declared_floors()
    assert set(FLOORED) <= set(floors), floors


@pytest.mark.floor
def test_every_module_imports_and_fits_on_the_floor_versions(tmp_path):
    floors = declared_floors()
    py = floor_venv(tmp_path, [f"{name}=={floors[name]}" for name in FLOORED])
    check = ("import importlib, pkgutil, lightning_rec, pytorch_lightning, torchmetrics, hydra, wandb\n"
             "print(pytorch_lightning.__version__, torchmetrics.__version__, hydra.__version__, wandb.__version__)\n"
             "for m in pkgutil.walk_packages(lightning_rec.__path__, 'lightning_rec.'):\n"
             "    if not m.name.startswith('lightning_rec.methods.federated'):  # Flower: an extra, floored there\n"
             "        importlib.import_module(m.name)\n"
             "import lightning_rec.callbacks, lightning_rec.conf\n")
    p = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from packaging.version import Version

    assert [Version(v) for v in p.stdout.split()] == [Version(floors[n]) for n in FLOORED], p.stdout
    p = subprocess.run([py, "-m", "lightning_rec", "fit", "data=synthetic", "data.synthetic.num_users=64", "data.synthetic.num_items=50",
                        "trainer.max_epochs=1", "logger=csv", "model.d_model=16", f"runs_dir={tmp_path / 'runs'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test metrics" in p.stdout


@pytest.mark.floor
def test_the_fast_reader_works_on_the_pandas_floor(tmp_path):
    """The ``fast`` extra's pandas floor: pandas' C parser reads every format, with the line reader's result."""
    floor = declared_floors("fast")["pandas"]
    py = floor_venv(tmp_path, [f"pandas=={floor}"])
    check = ("import numpy as np, pandas\n"
             "from lightning_rec.data import encode, read_sequences\n"
             "from lightning_rec.data.readers import _read_fast\n"
             "files = {'s.txt': ('sasrec', '1 5\\n2 7\\n1 6\\n'), 'r.dat': ('movielens', '1::5::3::9\\n1::6::4::2\\n'),\n"
             "         'u.data': ('udata', '1\\t5\\t3\\t9\\n1\\t6\\t4\\t2\\n'),\n"
             "         'r.csv': ('csv', 'user_id,item_id,timestamp\\nalice,b,5\\nalice,a,1\\nbob,c,3\\n')}\n"
             "for name, (fmt, text) in files.items():\n"
             "    open(name, 'w').write(text)\n"
             "    fast = _read_fast(name, fmt, 'user_id', 'item_id', 'timestamp', None, None, ',' if fmt == 'csv' else None)\n"
             "    slow = encode(read_sequences(name, fmt))\n"
             "    assert fast is not None, name\n"
             "    assert fast.user_ids == slow.user_ids and fast.item_ids == slow.item_ids, name\n"
             "    assert np.array_equal(fast.items, slow.items) and np.array_equal(fast.indptr, slow.indptr), name\n"
             "print(pandas.__version__)\n")
    p = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-1] == floor


SERVE_CHECK = r"""
import json, socket, sys, threading, time, urllib.request
import numpy as np, torch
import onnx, onnxscript, onnxruntime, faiss, fastapi, uvicorn
from lightning_rec.modules import SeqRecModule
from lightning_rec.serving import Bundle
from lightning_rec.serving.http import create_app
from lightning_rec.serving.write import write_bundle
print(json.dumps({"onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
                  "faiss-cpu": faiss.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}))
torch.manual_seed(0)
for arch in ("sasrec", "nextitnet"):
    model = SeqRecModule(num_items=200, arch=arch, d_model=16, num_blocks=2, max_len=12).eval()
    ids = ["<pad>"] + [f"i{i}" for i in range(1, 201)]
    m = write_bundle(model, ids, f"b_{arch}", "onnx", max_len=12, index="hnsw", recall_queries=50, log=print)
    assert m["parity_max_abs"] < 1e-4 and m["index"]["recall_at_k"] >= 0.95, m
    b = Bundle.load(f"b_{arch}", use_index=False)
    with torch.no_grad():
        s = model.user_representation(torch.tensor([[0, 0, 0, 3, 7, 9]])) @ model.output_weight().T
    s[0, [0, 3, 7, 9]] = -float("inf")
    assert b.recommend(["i3", "i7", "i9"], 5)["items"] == [f"i{i}" for i in s[0].topk(5).indices.tolist()], arch
with socket.socket() as sk:
    sk.bind(("127.0.0.1", 0)); port = sk.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(create_app(Bundle.load("b_sasrec")), host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2); break
    except OSError:
        time.sleep(0.1)
req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=json.dumps({"history": ["i3"], "k": 4}).encode(),
                             headers={"content-type": "application/json"})
got = json.loads(urllib.request.urlopen(req, timeout=10).read())
assert got == Bundle.load("b_sasrec").recommend(["i3"], 4), got
server.should_exit = True
print("serve ok")
"""


@pytest.mark.floor
def test_the_serve_extra_exports_loads_and_serves_on_its_floors(tmp_path):
    """The ``serve`` extra's floors: torch's ONNX exporter on the onnx/onnxscript floors, onnxruntime, the FAISS
    index, FastAPI + uvicorn answering a request."""
    floors = declared_floors("serve")
    assert set(floors) == {"onnx", "onnxscript", "onnxruntime", "faiss-cpu", "fastapi", "uvicorn"}, floors
    py = floor_venv(tmp_path, [f"{name}=={v}" for name, v in floors.items()])
    p = subprocess.run([py, "-c", SERVE_CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    import json

    from packaging.version import Version

    got = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("{")))
    assert {n: Version(v) for n, v in got.items()} == {n: Version(v) for n, v in floors.items()}, got
    assert "serve ok" in p.stdout


@pytest.mark.floor
def test_an_onnx_bundle_needs_only_numpy_and_onnxruntime(tmp_path):
    """A bundle loads and answers in an environment with numpy and onnxruntime (its floor) and nothing else: no
    torch, Lightning, Hydra or faiss installed (the package itself is put on the path, not installed)."""
    import torch

    from lightning_rec.modules import SeqRecModule
    from lightning_rec.serving.write import write_bundle

    torch.manual_seed(0)
    model = SeqRecModule(num_items=60, d_model=8, num_blocks=1, max_len=10).eval()
    write_bundle(model, ["<pad>"] + [f"i{i}" for i in range(1, 61)], str(tmp_path / "b"), "onnx", max_len=10,
                 log=lambda s: None)
    with torch.no_grad():
        s = model.user_representation(torch.tensor([[5, 2]])) @ model.output_weight().T
    s[0, [0, 5, 2]] = -float("inf")
    env_dir = tmp_path / "bare"
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    floor = declared_floors("serve")["onnxruntime"]
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "numpy", f"onnxruntime=={floor}"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    code = ("import importlib.util, json, sys\n"
            "from lightning_rec.serving import Bundle\n"
            "r = Bundle.load('b').recommend(['i5', 'i2'], k=6)\n"
            "print(json.dumps(r['items']))\n"
            "print([m for m in ('torch', 'pytorch_lightning', 'hydra', 'faiss') if importlib.util.find_spec(m)])\n")
    p = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-3000:]
    items, installed = p.stdout.strip().splitlines()[-2:]
    assert installed == "[]"  # none of them is even installed there
    import json

    assert json.loads(items) == [f"i{i}" for i in s[0].topk(6).indices.tolist()]
