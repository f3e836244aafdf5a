"""``--generator hf|vllm``: what generates for a verb (``--engine`` says where the work runs).

``hf`` generates in-process (``probes.generate``). ``vllm`` sends the unsteered generation to a
vLLM server: the user's (``--generator-url``, e.g. on a GPU box or behind a load balancer) or one
started from the project's engine environment for this run and stopped at its end
(``curation.pipeline.vllm_server``). The probe pass, steered cells and adapted models stay
in-process whatever the generator (``probes.generate.remote_allowed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from curation.cli.options import Option

if TYPE_CHECKING:
    from curation.cli.verb import Settings
    from probes.models import LoadedModel

GENERATOR_OPTIONS = [
    Option("--generator", str, "hf", "what generates: hf (transformers generate, in this process) or vllm (a vLLM "
           "server: --generator-url, or one started from `make engine`'s environment for this run)", choices=("hf", "vllm")),
    Option("--generator-url", str, None, "with --generator vllm: a running server's base URL (http://gpu-box:8000)"),
    Option("--generator-model", str, None, "with --generator-url: the served model name (default: the one it serves)"),
    Option("--generator-max-model-len", int, None, "a server this run starts: its --max-model-len "
           "(default: the model's own context)", minimum=16),
    Option("--generator-startup-timeout", float, 600.0, "a server this run starts: seconds to wait for it to be healthy"),
]

_VLLM_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


@contextmanager
def generation_engine(s: Settings, lm: LoadedModel, log_dir: str | Path) -> Iterator[LoadedModel]:
    """``lm`` with its generator attached for the verb's run, and detached (a server it started,
    stopped) on the way out."""
    from probes.remote_generate import RemoteGenerator

    if s.get("generator", "hf") == "hf":
        if s.get("generator_url"):
            raise ValueError("--generator-url is for --generator vllm")
        yield lm
        return
    try:
        if s.get("generator_url"):
            lm.generator = RemoteGenerator(s["generator_url"], model=s.get("generator_model"))
            lm.generator.check(lm.tokenizer, lm.fingerprint)
            yield lm
            return
        from curation.pipeline.vllm_server import ServerSettings, served

        dtype = _VLLM_DTYPES.get(str(lm.model.dtype))
        if dtype is None:
            raise ValueError(f"--generator vllm: the model is loaded as {lm.model.dtype}, which vLLM does not serve")
        settings = ServerSettings(model_dir=str(lm.path), dtype=dtype, max_model_len=s.get("generator_max_model_len"),
                                  startup_timeout_s=float(s.get("generator_startup_timeout") or 600.0),
                                  seed=int(s.get("sampling_seed") or 0))
        with served(settings, Path(log_dir) / "vllm-server.log") as url:
            lm.generator = RemoteGenerator(url, model=settings.served_name)
            lm.generator.check(lm.tokenizer, lm.fingerprint)
            yield lm
    finally:
        lm.generator = None
