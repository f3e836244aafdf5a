"""Generation through a vLLM server (``--generator vllm``), over its OpenAI-compatible API.

The project renders every prompt itself (``probes.chat``) and sends the *token ids*, and asks
for the generated token ids back (vLLM's ``return_token_ids``), so the server never applies a
template of its own and the rows it makes are the rows ``generate`` makes in-process: the same
prompt ids, the same stop tokens, stored under the same key (model fingerprint and generation
settings). Which generator made a row is recorded with the run, not in the key.

Before the first request the server is checked: it serves the named model, its tokenizer
encodes a probe text to the ids the local tokenizer gives (a server running another model, or
another revision's tokenizer, is refused), and its ``max_model_len`` is read, so a prompt whose
budget the server would cut is a row error with its reason instead of a shorter trace stored
as if it were whole.

LoRA adapters: a fine-tuned model generates on the server too when the server holds its adapter
(``load_adapter``: vLLM's ``/v1/load_lora_adapter``, on a server started with LoRA enabled and
runtime loading allowed). Requests then name the adapter as their model; the tokenizer check is
the base model's. A server that cannot load it (no LoRA support, a module it cannot adapt, a path
it cannot see) is an ``AdapterUnavailable`` with its reason, and the caller generates in-process.

Faults: a server that cannot be reached, or stops answering mid-run, raises
``GeneratorUnavailable`` (the run stops; what was committed stays, and a rerun resumes); a
request the server refuses for one prompt raises ``GeneratorRowError`` for that row only (it is
quarantined with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "CURATE_GENERATOR_API_KEY"
# Text whose ids must agree between the two tokenizers: words, digits, spacing, and no special tokens.
_PROBE_TEXT = "The refusal cliff, measured 12 times:\n  first line; then 3.5% of 1,024 rows!"


class GeneratorUnavailable(RuntimeError):
    """The server cannot be used at all (unreachable, died, wrong model): the run stops."""


class GeneratorRowError(ValueError):
    """The server refused one prompt (too long for it, …): that row is quarantined."""


class AdapterUnavailable(RuntimeError):
    """The server cannot serve a LoRA adapter: that model generates in-process instead."""


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RemoteGenerator:
    url: str  # the server's base URL, with or without /v1
    model: str | None = None  # the served model name; None: the one model the server lists
    timeout_s: float = 600.0  # one request; a reasoning trace of thousands of tokens takes a while
    concurrency: int = 32  # requests in flight: the server batches them continuously
    retries: int = 2  # a dropped connection is retried this many times before the server counts as gone
    max_model_len: int | None = field(default=None, init=False)
    checked_for: str | None = field(default=None, init=False)  # the local model fingerprint it was checked against
    adapters: dict[str, str] = field(default_factory=dict, init=False)  # local adapter path -> its name on the server

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def describe(self, adapter: str | None = None) -> dict[str, Any]:
        out = {"generator": "vllm", "url": self.base, "model": self.model, "max_model_len": self.max_model_len}
        return out | ({"adapter": adapter, "served_as": self.adapters[adapter]} if adapter in self.adapters else {})

    def serves(self, adapter: str | None) -> bool:
        """Whether generation with ``adapter`` (None: the base model) may go to this server."""
        return adapter is None or str(adapter) in self.adapters

    def model_for(self, adapter: str | None) -> str | None:
        return self.model if adapter is None else self.adapters[str(adapter)]

    def load_adapter(self, adapter: str | Any) -> str:
        """Load a LoRA adapter folder into the server (once) and return the name requests use for it.
        The folder's path must be one the server can read (the same machine, or shared storage)."""
        key = str(adapter)
        if key in self.adapters:
            return self.adapters[key]
        from pathlib import Path

        folder = Path(key).resolve()
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file() or not (folder / "adapter_config.json").is_file():
            raise AdapterUnavailable(f"{folder} is not a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
        # Named by content, so a retrained adapter at the same path is never confused with the old one.
        h = hashlib.sha256((folder / "adapter_config.json").read_bytes())
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
        name = f"curate-lora-{digest}"
        try:
            # A 500 here is the server's verdict on this folder (bad config or weights), not a passing fault.
            self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)},
                          retry_server_errors=False)
        except GeneratorRowError as exc:
            if "already been loaded" not in str(exc):
                raise AdapterUnavailable(f"the vLLM server could not load the adapter {folder}: {exc} (it needs "
                                         "--enable-lora, a --max-lora-rank at least the adapter's rank, "
                                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the folder on its own disk)") from None
        self.adapters[key] = name
        return name

    # HTTP -----------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                 retry_server_errors: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    text = response.read().decode("utf-8")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return text  # some endpoints (load_lora_adapter) answer in plain text
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:500]
                if 400 <= exc.code < 500 or not retry_server_errors:
                    raise GeneratorRowError(f"the vLLM server at {self.base} refused {path} ({exc.code}): {detail}") from None
                last = RuntimeError(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
            if attempt < self.retries:
                time.sleep(1.0 * (attempt + 1))
        raise GeneratorUnavailable(f"the vLLM server at {self.base} did not answer {path} "
                                   f"({self.retries + 1} tries): {last}") from None

    # checks ---------------------------------------------------------------
    def check(self, tokenizer: Any, fingerprint: str) -> None:
        """The server serves this model, with this tokenizer; read its context limit."""
        if self.checked_for == fingerprint:
            return
        # LoRA adapters loaded into the server are listed too, each with its base model as "parent".
        listed = [m for m in self._request("GET", "/v1/models").get("data", []) if not m.get("parent")]
        names = [m.get("id") for m in listed]
        if self.model is None:
            if len(names) != 1:
                raise GeneratorUnavailable(f"the vLLM server at {self.base} serves {names or 'no model'}: "
                                           "name the one to use with --generator-model")
            self.model = names[0]
        entry = next((m for m in listed if m.get("id") == self.model), None)
        if entry is None:
            raise GeneratorUnavailable(f"the vLLM server at {self.base} does not serve {self.model!r} (it serves {names})")
        self.max_model_len = entry.get("max_model_len")
        theirs = self._request("POST", "/tokenize", {"model": self.model, "prompt": _PROBE_TEXT,
                                                     "add_special_tokens": False}).get("tokens")
        ours = list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
        if theirs != ours:
            raise GeneratorUnavailable(
                f"the vLLM server at {self.base} ({self.model}) tokenizes differently from the local model "
                f"(tokenizer digest {_digest(ours)} here, {_digest(theirs)} there): it serves another model or revision")
        self.checked_for = fingerprint

    # generation -----------------------------------------------------------
    def complete(self, prompts: Sequence[list[int]], *, max_tokens: int, stop_token_ids: Sequence[int],
                 sampling: Any, on_done: Callable[[int], None] | None = None,
                 adapter: str | None = None) -> list[Completion | GeneratorRowError]:
        """One completion per prompt (token ids in, token ids out), in the prompts' order; a prompt
        the server refused comes back as its ``GeneratorRowError``. With ``adapter`` (loaded with
        ``load_adapter``) the requests name it as their model."""
        model = self.model_for(adapter)

        def one(index: int) -> Completion | GeneratorRowError:
            ids = prompts[index]
            if self.max_model_len is not None and len(ids) + max_tokens > self.max_model_len:
                return GeneratorRowError(
                    f"prompt of {len(ids)} tokens + budget {max_tokens} is over the vLLM server's max_model_len "
                    f"{self.max_model_len}: the server would cut the trace short; serve with a larger --max-model-len "
                    "or lower --max-new-tokens")
            body: dict[str, Any] = {
                "model": model, "prompt": ids, "max_tokens": max_tokens, "stop_token_ids": list(stop_token_ids),
                "return_token_ids": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
                "ignore_eos": False, **_decoding(sampling, index)}
            try:
                choice = self._request("POST", "/v1/completions", body)["choices"][0]
            except GeneratorRowError as exc:
                return exc
            token_ids = choice.get("token_ids")
            if token_ids is None:
                raise GeneratorUnavailable(f"the vLLM server at {self.base} returned no token ids "
                                           "(return_token_ids needs vLLM 0.10.2 or later)")
            if on_done is not None:
                on_done(1)
            return Completion(list(token_ids), choice.get("finish_reason"))

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(one, range(len(prompts))))


def _decoding(sampling: Any, index: int) -> dict[str, Any]:
    """The request's decoding fields from the model's ``Sampling``; a sampled request gets its own
    seed from the settings' seed and its place, so a rerun draws the same samples."""
    if sampling.greedy:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or -1,
            "seed": sampling.seed * 1_000_003 + index}


def _digest(ids: Sequence[int] | None) -> str:
    return hashlib.sha256(json.dumps(list(ids or [])).encode()).hexdigest()[:12]
