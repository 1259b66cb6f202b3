"""``serve``: the HTTP endpoint answers real requests on 127.0.0.1 with the bundle's recommendations, refuses bad
ones with one-line 400/422 answers, and listens on this machine only unless asked."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from lightning_rec.cli import run
from lightning_rec.errors import ConfigError
from lightning_rec.serving import Bundle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_address():
    """This machine's non-loopback address, when it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _call(url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def bundle_dir(tmp_path):
    from lightning_rec.modules import SeqRecModule
    from lightning_rec.serving.write import write_bundle

    model = SeqRecModule(num_items=50, d_model=8, num_blocks=1, max_len=10)
    dest = tmp_path / "bundle"
    write_bundle(model, ["<pad>"] + [f"i{i}" for i in range(1, 51)], str(dest), "onnx", max_len=10,
                 index="flat", recall_queries=20, log=lambda s: None)
    return dest


def test_serve_answers_real_http_requests_on_localhost(bundle_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lightning_rec", "serve", f"bundle={bundle_dir}", f"port={port}",
                             "max_k=20", "max_batch=3"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, health = _call(f"{base}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "serve did not answer within 90 s"
                time.sleep(0.3)
        assert status == 200 and health["status"] == "ok" and health["num_items"] == 50 and health["index"] == "flat"
        b = Bundle.load(str(bundle_dir))
        status, got = _call(f"{base}/recommend", {"history": ["i3", "i7", "nope"], "k": 5})
        assert status == 200 and got == b.recommend(["i3", "i7", "nope"], 5) and got["skipped"] == 1
        status, got = _call(f"{base}/recommend/batch", {"histories": [["i1"], ["i2", "i9"]], "k": 4,
                                                          "exclude_seen": False})
        assert status == 200 and got["results"] == b.recommend_batch([["i1"], ["i2", "i9"]], 4, exclude_seen=False)
        for body, code, detail in [
            ({"history": ["nope"], "k": 3}, 400, "history: no known item to recommend from (all 1 ids are unknown"),
            ({"history": ["i1"], "k": 21}, 400, "k=21: this server answers k up to 20"),
            ({"history": ["i1"], "k": 0}, 400, "k=0: expected an integer in 1..50"),
        ]:
            status, got = _call(f"{base}/recommend", body)
            assert status == code and got["detail"].startswith(detail), got
        status, got = _call(f"{base}/recommend/batch", {"histories": [["i1"]] * 4, "k": 2})
        assert status == 400 and "4 in one request; this server takes up to 3" in got["detail"]
        status, got = _call(f"{base}/recommend", {"k": 2})  # no history: FastAPI's validation
        assert status == 422 and got["detail"][0]["loc"] == ["body", "history"]
        other = _own_address()
        if other:  # bound to 127.0.0.1 by default: not reachable on the machine's other address
            with pytest.raises((urllib.error.URLError, ConnectionError, TimeoutError)):
                _call(f"http://{other}:{port}/health", timeout=2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    said = (tmp_path / "serve.log").read_text()
    assert f"on http://127.0.0.1:{port}" in said and "index flat" in said


def test_serve_refuses_bad_options_in_one_line(tmp_path, bundle_dir):
    with pytest.raises(ConfigError, match="serve: needs bundle="):
        run(["serve"])
    with pytest.raises(ConfigError, match="not a folder"):
        run(["serve", f"bundle={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="port=70000: expected a TCP port"):
        run(["serve", f"bundle={bundle_dir}", "port=70000"])
    with pytest.raises(ConfigError, match="no manifest.json"):
        run(["serve", f"bundle={tmp_path}", f"port={_free_port()}"])
