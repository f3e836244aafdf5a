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
from typing import TYPE_CHECKING, Any

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


def adapter_rank(adapter: str | Path) -> int:
    """The LoRA rank of a PEFT adapter folder (what a server must be started to take)."""
    import json

    config = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config}: not a readable PEFT adapter config ({exc})") from None


def attach_adapter(lm: LoadedModel, say: Any = None) -> str | None:
    """Load ``lm``'s adapter into its server, so that its unsteered generation goes there too; the
    reason when the server cannot take it (it then generates in-process, and says so)."""
    from probes.remote_generate import AdapterUnavailable

    if lm.generator is None or lm.adapter is None:
        return None
    try:
        lm.generator.load_adapter(lm.adapter)
    except AdapterUnavailable as exc:
        if say is not None:
            say(f"{exc}; this model generates in-process")
        return str(exc)
    return None


@contextmanager
def remote_generator(model_dir: str | Path, dtype: Any, *, url: str | None = None, model: str | None = None,
                     max_model_len: int | None = None, startup_timeout_s: float = 600.0, seed: int = 0,
                     lora_rank: int | None = None, log_path: str | Path = "vllm-server.log") -> Iterator[Any]:
    """A ``RemoteGenerator`` for the server at ``url``, or for one started here from ``make engine``'s
    environment (taking LoRA adapters up to ``lora_rank`` when given), stopped on the way out."""
    from probes.remote_generate import RemoteGenerator

    if url:
        yield RemoteGenerator(url, model=model)
        return
    from curation.pipeline.vllm_server import ServerSettings, served

    vllm_dtype = _VLLM_DTYPES.get(str(dtype))
    if vllm_dtype is None:
        raise ValueError(f"--generator vllm: the model is loaded as {dtype}, which vLLM does not serve")
    settings = ServerSettings(model_dir=str(model_dir), dtype=vllm_dtype, max_model_len=max_model_len,
                              startup_timeout_s=startup_timeout_s, seed=seed, lora_rank=lora_rank)
    with served(settings, Path(log_path)) as started:
        yield RemoteGenerator(started, model=settings.served_name)


@contextmanager
def generation_engine(s: Settings, lm: LoadedModel, log_dir: str | Path) -> Iterator[LoadedModel]:
    """``lm`` with its generator attached for the verb's run, and detached (a server it started,
    stopped) on the way out."""
    if s.get("generator", "hf") == "hf":
        if s.get("generator_url"):
            raise ValueError("--generator-url is for --generator vllm")
        yield lm
        return
    try:
        with remote_generator(lm.path, lm.model.dtype, url=s.get("generator_url"), model=s.get("generator_model"),
                              max_model_len=s.get("generator_max_model_len"),
                              startup_timeout_s=float(s.get("generator_startup_timeout") or 600.0),
                              seed=int(s.get("sampling_seed") or 0), log_path=Path(log_dir) / "vllm-server.log",
                              lora_rank=adapter_rank(lm.adapter) if lm.adapter else None) as generator:
            lm.generator = generator
            lm.generator.check(lm.tokenizer, lm.fingerprint)
            from curation.cli.verb import console

            attach_adapter(lm, lambda m: console.print(f"[yellow]warning:[/] {m}", markup=True, highlight=False))
            yield lm
    finally:
        lm.generator = None
