"""The Triton vision backend against a real Triton server: PyTriton's tritonserver (from `make triton-env`)
serving an fp32 bundle's `deploy triton` repository through Python-backend models that run model.onnx with
ONNX Runtime (support/triton_vision.py), on loopback ports, started here and stopped by its PID. `ask
--vision-url` gives exactly the local backend's token ids for a wide and a tall image; `encode`, `chat` and
`serve` run on it; a server that is down and a model it does not serve are one-line errors."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.serving import Server, free_port

from convllava_edge.cli.main import main
from convllava_edge.deploy_triton import deploy_triton

from convllava_edge.export.probe_images import probe_images

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "How many shapes are there?"
GREEDY = ["--temperature", "0", "--max-tokens", "12", "--no-cache"]


def triton_python() -> Path:
    python = Path(os.environ.get("CONVLLAVA_EDGE_TRITON_PYTHON", ROOT / ".venv-triton" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"{python} is missing: `make triton-env` builds PyTriton's environment (make test does)")
    return python


@pytest.fixture(scope="module")
def bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32",), llm_type="F32")  # shared with test_e2e.py


@pytest.fixture(scope="module")
def triton(bundle, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    (model,) = deploy_triton(bundle, repo)
    ports = [free_port() for _ in range(3)]
    log = repo.parent / "triton.log"
    proc = subprocess.Popen([str(triton_python()), str(ROOT / "tests" / "support" / "triton_vision.py"), str(repo),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the model, not only the server: PyTriton binds its models after the server starts
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/models/{model.name}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # tritonserver and its Python stubs, by the process group we started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    wide, tall = probe_images(5, seed=40)[3], probe_images(5, seed=41)[4]  # 800x320 and 300x700
    wide.save(folder / "wide.png")
    tall.save(folder / "tall.png")
    return {"wide": folder / "wide.png", "tall": folder / "tall.png"}


def ask_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["ask", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["wide", "tall"])
def test_ask_is_token_exact_with_the_local_backend(bundle, triton, images, which, capsys):
    common = [str(images[which]), QUESTION, "--model", str(bundle), *GREEDY]
    local = ask_json(capsys, *common)
    there = ask_json(capsys, *common, "--vision-url", triton)
    assert there["token_ids"] == local["token_ids"] and there["n_image_tokens"] == local["n_image_tokens"] > 0
    assert there["vision_backend"] == "triton" and there["providers"] == [f"Triton ({triton})"]


@pytest.mark.timeout(300)
def test_encode_and_serve_run_on_it(bundle, triton, images, tmp_path, capsys):
    here, there = tmp_path / "here.npy", tmp_path / "there.npy"
    assert main(["encode", str(images["wide"]), "--model", str(bundle), "--save", str(here),
                 "--vision-backend", "onnxruntime"]) == 0
    assert main(["encode", str(images["wide"]), "--model", str(bundle), "--save", str(there), "--vision-url", triton]) == 0
    assert np.array_equal(np.load(here), np.load(there))  # the same graph on the same runtime, fp32
    expected = ask_json(capsys, str(images["wide"]), QUESTION, "--model", str(bundle), *GREEDY)["token_ids"]
    server = Server(tmp_path, "--model", str(bundle), "--vision-url", triton)
    try:
        url = "data:image/png;base64," + base64.b64encode(images["wide"].read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}],
                "temperature": 0, "max_tokens": 12}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["token_ids"] == expected, r.text
        assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["vision"]["backend"] == "triton"
    finally:
        assert server.stop() == 0


@pytest.mark.timeout(120)
def test_server_down_and_unknown_model_are_one_line_errors(bundle, triton, images, capsys):
    def ask(*extra: str) -> str:
        capsys.readouterr()
        assert main(["ask", str(images["wide"]), QUESTION, *GREEDY, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ")
        return err
    assert "cannot reach Triton at http://127.0.0.1:9" in ask("--model", str(bundle), "--vision-url", "http://127.0.0.1:9")
    # the demo's graph is not in this server's repository
    assert "does not serve 'shapes-demo-checkpoint_vision' version 1" in ask("--vision-url", triton)
    assert "--vision-url" in ask("--model", str(bundle), "--vision-url", triton, "--vision-backend", "openvino")
    assert "expected http://HOST:PORT" in ask("--model", str(bundle), "--vision-url", "ftp://x")
