"""A vLLM OpenAI server for the vLLM backend's tests: a child process from the environment `make vllm-env` builds
(.venv-vllm, or $CONVLLAVA_EDGE_VLLM_PYTHON), on a free loopback port, stopped by its PID. The toolkit's own venv
never imports vLLM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .serving import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
START_S = 240  # ~30-50 s here; bounded so that a broken environment fails the module, not the whole run


def vllm_python() -> Path:
    python = Path(os.environ.get("CONVLLAVA_EDGE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"the vLLM backend's tests need vLLM's own environment ({python}): make vllm-env")
    return python


class VllmServer:
    def __init__(self, model_dir: Path, log: Path, name: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", name, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
             "--host", "127.0.0.1", "--port", str(self.port), *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, log, START_S, interval=1)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM to its process group (the engine runs in a child of the server), then SIGKILL."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
