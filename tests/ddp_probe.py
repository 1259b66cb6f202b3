"""The probe callbacks live in tests/methods/ddp_probe.py; this name keeps ``ddp_probe.X`` working for the tests
outside tests/methods (``+callbacks.x._target_=ddp_probe.X``, in process and in the processes they launch with
``PYTHONPATH=tests``). Importing it loads that file as the module ``ddp_probe``, so both paths give one module."""

import importlib.util
import os
import sys

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods", "ddp_probe.py")
_spec = importlib.util.spec_from_file_location(__name__, _path)
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
