"""The package's structure is a contract: layers import only downwards and no modules import each other in a
cycle (``.importlinter``, checked with import-linter); generic callbacks sit below the methods; callbacks talk
to modules through public hooks, not by writing themselves into a module's ``__dict__``."""

import ast
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CONTRACT = os.path.join(ROOT, ".importlinter")


def lint_imports(package_parent: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=package_parent)
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                           CONTRACT, "--no-cache"], cwd=package_parent, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contract_holds():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout


def _copy_package(tmp_path) -> str:
    dest = tmp_path / "lightning_rec"
    shutil.copytree(os.path.join(ROOT, "lightning_rec"), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    pkg = _copy_package(tmp_path)
    with open(os.path.join(pkg, "models", "__init__.py"), "a") as f:
        f.write("\nfrom lightning_rec.cli import fit as _planted  # noqa\n")
    out = lint_imports(str(tmp_path))
    assert out.returncode != 0
    assert "lightning_rec.models is not allowed to import lightning_rec.cli" in " ".join(out.stdout.split())


def test_a_planted_cycle_breaks_the_contract(tmp_path):
    pkg = _copy_package(tmp_path)  # two sibling modules of one layer importing each other
    with open(os.path.join(pkg, "runs", "launch.py"), "a") as f:
        f.write("\nfrom lightning_rec.runs import console as _planted  # noqa\n")
    with open(os.path.join(pkg, "runs", "console.py"), "a") as f:
        f.write("\nfrom lightning_rec.runs import launch as _planted  # noqa\n")
    out = lint_imports(str(tmp_path))
    assert out.returncode != 0
    assert "no import cycles" in out.stdout and "BROKEN" in out.stdout


# the installed package maps callbacks/ to lightning_rec.callbacks, which import-linter does not see: check it here
CALLBACKS_MAY_IMPORT = ("lightning_rec.callbacks", "lightning_rec.modules", "lightning_rec.models", "lightning_rec.data",
                        "lightning_rec.losses", "lightning_rec.metrics", "lightning_rec.runs", "lightning_rec.config",
                        "lightning_rec.errors")


def _imports(path: str) -> list[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module if node.level == 0 else f"lightning_rec.callbacks.{node.module}")
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_generic_callbacks_import_only_lower_layers():
    folder = os.path.join(ROOT, "callbacks")
    bad = [f"{name}: {mod}" for name in sorted(os.listdir(folder)) if name.endswith(".py")
           for mod in _imports(os.path.join(folder, name))
           if mod.startswith("lightning_rec") and not mod.startswith(CALLBACKS_MAY_IMPORT)]
    assert not bad, bad


def test_no_callback_writes_itself_into_a_module():
    hits = []
    for base in ("lightning_rec", "callbacks"):
        for d, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(d, name), encoding="utf-8").read()
                    hits += [f"{name}: {m}" for m in re.findall(r"\w+\.__dict__\[[^\]]*\]", text)
                             if not m.startswith("self.")]
    assert not hits, hits
