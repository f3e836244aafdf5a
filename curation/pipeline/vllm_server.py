"""A vLLM server that the project starts for one run and stops at its end (``--generator vllm``
with no ``--generator-url``).

vLLM lives in its own virtual environment (``make engine``: its pins clash with the project's),
so the server is that environment's ``vllm.entrypoints.openai.api_server`` in a child process,
on a free local port, in its own process group. Start-up is polled on ``/health`` until
``startup_timeout_s``; a server that exits first, or never answers, is an error that quotes the
tail of its log. On the way out, normal or not (Ctrl-C, SIGTERM), the process group is stopped.
With no GPU the CPU backend is chosen (``VLLM_TARGET_DEVICE=cpu``) with a small KV cache.
With ``lora_rank`` the server takes LoRA adapters at run time (``--enable-lora``, runtime
loading allowed), so fine-tuned rows generate on it too (``RemoteGenerator.load_adapter``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PYTHON_ENV = "CURATE_ENGINE_PYTHON"


def engine_python() -> Path:
    """The engine environment's interpreter: ``CURATE_ENGINE_PYTHON`` or ``.venv-engine`` (make engine)."""
    path = Path(os.environ.get(ENGINE_PYTHON_ENV) or ROOT / ".venv-engine" / "bin" / "python")
    if not path.exists():
        raise FileNotFoundError(f"no vLLM engine environment at {path}: build it with `make engine`, set "
                                f"{ENGINE_PYTHON_ENV}, or point --generator-url at a running server")
    return path


@dataclass(frozen=True)
class ServerSettings:
    model_dir: str
    served_name: str = "curate-model"
    dtype: str = "float32"  # fp32 on CPU: the only dtype whose greedy tokens match HF's there
    max_model_len: int | None = None
    startup_timeout_s: float = 600.0
    cpu_kv_cache_gib: int = 1
    seed: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    lora_rank: int | None = None  # the largest LoRA rank to serve (None: no adapters)


# The ranks vLLM accepts for --max-lora-rank; an adapter's rank is served under the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_args(rank: int) -> list[str]:
    served = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if served is None:
        raise ValueError(f"a LoRA rank of {rank} is over vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    return ["--enable-lora", "--max-lora-rank", str(served), "--max-loras", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def served(settings: ServerSettings, log_path: Path) -> Iterator[str]:
    """Start the server, yield its base URL once healthy, stop it on the way out."""
    python = engine_python()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", settings.model_dir,
           "--served-model-name", settings.served_name, "--dtype", settings.dtype, "--host", "127.0.0.1",
           "--port", str(port), "--seed", str(settings.seed), *settings.extra_args]
    if settings.max_model_len is not None:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    env = dict(os.environ)
    if settings.lora_rank is not None:
        cmd += lora_args(settings.lora_rank)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if not _gpu_present():
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + settings.startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {proc.returncode} while starting; "
                                   f"the end of its log ({log_path}):\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not become healthy within {settings.startup_timeout_s:.0f} s; "
                                   f"the end of its log ({log_path}):\n{_tail(log_path)}")
            time.sleep(1.0)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
