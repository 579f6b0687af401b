"""Adapters on the Hub: a model card that says what the adapter is and how to load it, and a push helper whose
every request has a timeout and a bounded retry budget."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import huggingface_hub
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from .checks import choice, integer, number
from .methods import LORA
from .registry import known_methods, method_record

EXPORT_LORA = LORA.name  # push_adapter's export: the plain-LoRA form, in the subfolder of that name


def _card_fields(config) -> tuple[str, ...]:
    """The size fields of the config's method record; for a method without a record, every record's."""
    record = method_record(config.peft_type)
    if record is not None:
        return record.card_fields
    return tuple(dict.fromkeys(name for method in known_methods() for name in method.card_fields))


def _config_lines(config) -> list[str]:
    lines = []
    for name in _card_fields(config):
        value = getattr(config, name, None)
        if value not in (None, {}, [], ()):
            lines.append(f"- `{name}`: `{value}`")
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    lines.append(f"- `target_modules`: `{targets}`")
    return lines


def _display_name(method: str) -> str:
    record = method_record(method)
    return record.title if record is not None else method


def _is_ours(method: str) -> bool:
    """Whether ``import subspace_peft`` registers the method (else it is peft's own)."""
    record = method_record(method)
    return record is not None and not record.peft_builtin


# peft task types -> the Hub's pipeline tags
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1


def _check_card_fields(config, base_model: Optional[str], license: Optional[str], datasets) -> None:
    """Refuses, before anything is written or sent, a card others could not use: a local folder as the base model
    (the pushed adapter_config.json would send every user to a path on this machine), or malformed ids."""
    where = "push_adapter"
    if base_model is not None:
        if not isinstance(base_model, str) or not _is_hub_id(base_model):
            raise ValueError(
                f"{where}: base_model must be a Hub model id such as 'HuggingFaceTB/SmolLM2-135M', got {base_model!r}"
            )
        validate_repo_id(base_model)
    else:
        local = config.base_model_name_or_path
        if local and not _is_hub_id(local):
            raise ValueError(
                f"{where}: the adapter's base model is the local path {local!r}, which nobody else can load. Pass "
                "base_model='<hub id>' (the Hub model this folder was downloaded from); it is written as the card's "
                "base_model and into the pushed adapter_config.json."
            )
    if license is not None and (not isinstance(license, str) or not license.strip()):
        raise ValueError(f"{where}: license must be a Hub license id such as 'apache-2.0', got {license!r}")
    if datasets is not None:
        if isinstance(datasets, str) or not all(isinstance(d, str) and d.strip() for d in datasets):
            raise ValueError(
                f"{where}: datasets must be a list of Hub dataset ids, e.g. ['openai/gsm8k'], got {datasets!r}"
            )


def _write_base_model(folder: str, base_model: str) -> None:
    """Sets ``base_model_name_or_path`` in every adapter_config.json of a saved adapter (the native one and the
    ``lora/`` export), so AutoPeftModel finds the Hub base model."""
    for root, _, files in os.walk(folder):
        if "adapter_config.json" in files:
            path = os.path.join(root, "adapter_config.json")
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            saved["base_model_name_or_path"] = base_model
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(saved, handle, indent=2, sort_keys=True)


def model_card(
    peft_model,
    repo_id: str,
    adapter_name: str = "default",
    training_summary: Optional[dict] = None,
    exported_lora_rank: Optional[int] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    datasets: Optional[list[str]] = None,
) -> str:
    """The README.md of an adapter: YAML metadata (library_name peft, pipeline_tag, base_model, license, datasets,
    tags naming the method and ``base_model:adapter:<id>``) and a body with the method, its ranks, the trainable
    parameters, a training summary and the exact code that loads it. ``base_model`` (a Hub id) replaces the config's
    ``base_model_name_or_path``. With ``exported_lora_rank`` (the ``lora/`` folder :func:`push_adapter` adds), also
    how to load and serve that plain-LoRA export without this package."""
    config = peft_model.peft_config[adapter_name]
    method = config.peft_type.value if hasattr(config.peft_type, "value") else str(config.peft_type)
    base = base_model or config.base_model_name_or_path
    trainable, total = peft_model.get_nb_trainable_parameters()
    ours = _is_ours(method)
    task = getattr(config.task_type, "value", config.task_type)
    data = ModelCardData(
        library_name="peft",
        base_model=base or None,
        pipeline_tag=_PIPELINE_TAGS.get(task),
        license=license,
        datasets=list(datasets) if datasets else None,
        tags=["peft", method.lower()]
        + (["subspace-peft"] if ours else [])
        + ([f"base_model:adapter:{base}"] if _is_hub_id(base) else []),
    )
    base_line = f'"{base}"' if base else '"<the base model this adapter was trained on>"'
    model_class = (
        "AutoModelForCausalLM"
        if str(getattr(config, "task_type", "")) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
        else "AutoModel"
    )
    register = f"import subspace_peft  # registers {method} with peft (installed, subspace-peft also does it itself)"
    load = [register] if ours else []
    load += [
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f"base = {model_class}.from_pretrained({base_line})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
    ]
    name = _display_name(method)
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {name} adapter{f' for `{base}`' if base else ''}"
        + (", made with [subspace-peft](https://pypi.org/project/subspace-peft/)." if ours else "."),
        "",
        "## Adapter",
        "",
        f"- method: {name} (peft_type `{method}`)",
        *_config_lines(config),
        f"- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)",
        "",
    ]
    if training_summary:
        body += ["## Training", "", "| | |", "|---|---|"]
        body += [f"| {key} | {value} |" for key, value in training_summary.items()]
        body.append("")
    body += [
        "## How to load",
        "",
        "```bash",
        "pip install subspace-peft" if ours else "pip install peft",
        "```",
        "",
        "```python",
        *load,
        "```",
        "",
    ]
    if ours:
        body += [
            f"The adapter's `adapter_config.json` names the `{method}` type, which subspace-peft registers with peft: "
            "once it is installed, every Python process that imports peft knows it (transformers' adapter loading, "
            "pipelines and lm-eval included), with no code change; `SUBSPACE_PEFT_AUTOREGISTER=0` turns that off, "
            "and then `import subspace_peft` must run before loading. To use the adapter without this package, "
            "export it as plain LoRA: `subspace-peft export ADAPTER_DIR OUT_DIR`.",
            "",
        ]
    if exported_lora_rank is not None:
        body += _serving_lines(repo_id, base_line, model_class, exported_lora_rank)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content


def _serving_lines(repo_id: str, base_line: str, model_class: str, rank: int) -> list[str]:
    return [
        "## Serving: the plain-LoRA export in `lora/`",
        "",
        f"`lora/` holds the same update as an exact plain LoRA adapter (rank {rank}), which peft, vLLM and other LoRA "
        "servers load without subspace-peft:",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f"base = {model_class}.from_pretrained({base_line})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="lora")',
        "```",
        "",
        "For a server, download the folder and point the server's LoRA option at it, with a maximum LoRA rank of at "
        f"least {rank} (vLLM: `--enable-lora --max-lora-rank {rank}` or more, `--lora-modules name=<folder>/lora`):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        f'folder = snapshot_download("{repo_id}", allow_patterns=["lora/*"])',
        "```",
        "",
    ]


def _lora_rank(config) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


DEFAULT_TIMEOUT = 60.0  # seconds one network operation (connect, send, wait for the answer) may take
DEFAULT_MAX_RETRIES = 3  # retries of one failed Hub request, after its first attempt
# Answers worth another try: request timeout, rate limit, server errors (huggingface_hub's own backoff retries these)
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_MAX_WAIT = 8.0  # seconds between attempts: 1, 2, 4, 8, 8, ...

T = TypeVar("T")


class HubUnreachableError(ValueError):
    """A Hub request of :func:`push_adapter` timed out, could not connect, or kept failing (HTTP 408/429/5xx) until
    its retry budget was spent. The message names the endpoint and the fix."""


@dataclass
class _Budget:
    """The attempts of one push, per request (method and URL). The clients push_adapter's factory builds count
    every request they send: push_adapter's own retries and huggingface_hub's internal ones (its backoff loops, its
    committer thread) alike."""

    max_retries: int
    attempts: dict = field(default_factory=dict)  # (method, url) -> requests sent
    answers: dict = field(default_factory=dict)  # (method, url) -> HTTP status of the latest answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, request) -> None:
        """Request hook: stop a request past ``1 + max_retries`` attempts."""
        key = (request.method, str(request.url))
        with self.lock:
            status = self.answers.pop(key, None)
            self.attempts[key] = sent = self.attempts.get(key, 0) + 1
        if sent > self.max_retries + 1:
            raise _BudgetSpent(*key, sent - 1, status)

    def answered(self, response) -> None:
        """Response hook: the latest status per request, for the message when its budget runs out."""
        with self.lock:
            self.answers[(response.request.method, str(response.request.url))] = response.status_code


class _BudgetSpent(Exception):
    """Raised by the request hook when a request would exceed its retry budget. Not an HTTP error on purpose:
    huggingface_hub's own backoff loops retry HTTP errors, and must not retry this one."""

    def __init__(self, method: str, url: str, attempts: int, status: Optional[int]):
        super().__init__(f"{method} {url} failed {attempts} time(s)")
        self.attempts, self.status = attempts, status


_FACTORY_LOCK = threading.Lock()


@contextlib.contextmanager
def _bounded_client(timeout: float, budget: _Budget):
    """While the push runs, huggingface_hub's shared HTTP client is built with a ``timeout`` on every network
    operation and ``budget``'s hooks, through the library's own ``set_client_factory``; the previous factory (a
    user's proxy or certificate settings included: the new client is built by it) is put back afterwards.

    huggingface_hub has no public getter for the installed factory, so it is read from ``huggingface_hub.utils._http``
    (read only, never patched). The client is shared: hub requests other threads make during the push get the same
    timeout and budget, and ``set_client_factory`` closes the shared client on the way in and out, so a request
    another thread has in flight at that moment fails (huggingface_hub's backoff retries it where it has one).
    """
    set_factory = getattr(huggingface_hub, "set_client_factory", None)
    if set_factory is None:  # huggingface_hub < 1.0: a requests backend, without a client factory
        warnings.warn(
            f"huggingface_hub {huggingface_hub.__version__} has no set_client_factory: push_adapter retries failed "
            "requests but cannot bound how long one waits. Upgrade huggingface_hub (>= 1.0) for the timeout.",
            stacklevel=3,
        )
        yield
        return
    from huggingface_hub.utils import _http

    previous: Callable = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

    def factory():
        client = previous()
        client.timeout = type(client.timeout)(timeout)  # httpx(2).Timeout: connect, read, write and pool
        hooks = client.event_hooks
        client.event_hooks = {
            "request": [*hooks.get("request", []), budget.count],
            "response": [*hooks.get("response", []), budget.answered],
        }
        return client

    with _FACTORY_LOCK:
        set_factory(factory)
        try:
            yield
        finally:
            set_factory(previous)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network failures worth another attempt, for whichever HTTP library huggingface_hub runs on (already imported
    by it: nothing new is imported here)."""
    errors: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for module_name, names in (
        ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError")),
        ("requests", ("Timeout", "ConnectionError")),
    ):
        module = sys.modules.get(module_name)
        errors += [getattr(module, name) for name in names if module is not None and hasattr(module, name)]
    return tuple(errors)


def _status(error: BaseException) -> Optional[int]:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _unreachable(endpoint: str, happened: str, attempts: int, max_retries: int, detail: str) -> HubUnreachableError:
    detail = " ".join(detail.split())[:240]  # one line
    return HubUnreachableError(
        f"push_adapter: the Hub at {endpoint} {happened} ({attempts} attempt(s), max_retries={max_retries}; "
        f"{detail}). Check the network and HF_ENDPOINT (now {endpoint}), or pass a larger "
        "push_adapter(timeout=..., max_retries=...)."
    )


def _what_happened(error: BaseException, what: str, timeout: float) -> str:
    status = _status(error)
    if status is not None:
        return f"kept answering HTTP {status} to {what}"
    if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
        return f"did not answer {what} within timeout={timeout:g}s"
    return f"could not be reached for {what}"


def _with_retries(call: Callable[[], T], what: str, endpoint: str, timeout: float, max_retries: int) -> T:
    """``call()``, attempted up to ``1 + max_retries`` times on a timeout, a network error or HTTP 408/429/5xx (with
    1, 2, 4, 8, 8 ... seconds between attempts); then a :class:`HubUnreachableError`. Other errors (401, 404, ...)
    are raised as they are: another attempt would not change them."""
    transient = _transient_errors()
    wait = 1.0
    for attempt in range(1, max_retries + 2):
        try:
            return call()
        except _BudgetSpent as spent:
            happened = (
                f"kept answering HTTP {spent.status} to {what}"
                if spent.status is not None
                else f"did not answer {what} within timeout={timeout:g}s (or refused the connection)"
            )
            raise _unreachable(endpoint, happened, spent.attempts, max_retries, str(spent)) from spent
        except Exception as error:  # noqa: BLE001 - sorted into transient and final just below
            if not (isinstance(error, transient) or _status(error) in _RETRY_STATUS):
                raise
            if attempt > max_retries:
                raise _unreachable(
                    endpoint,
                    _what_happened(error, what, timeout),
                    attempt,
                    max_retries,
                    f"last error {type(error).__name__}: {error}",
                ) from error
        time.sleep(wait)
        wait = min(2 * wait, _MAX_WAIT)
    raise AssertionError("unreachable")  # the loop returns or raises


def _check_timeouts(timeout, max_retries) -> None:
    number("push_adapter", "timeout", timeout, f"pass e.g. timeout={DEFAULT_TIMEOUT:g} (seconds)", low=0, low_open=True)
    integer(
        "push_adapter", "max_retries", max_retries, f"pass e.g. max_retries={DEFAULT_MAX_RETRIES} (0: no retry)", low=0
    )


def _check_online(repo_id: str) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"push_adapter: the Hub is turned off in this process (HF_HUB_OFFLINE=1), so {repo_id!r} cannot be "
            "pushed; fix: unset HF_HUB_OFFLINE (or set it to 0) before starting Python"
        )


def push_adapter(
    peft_model,
    repo_id: str,
    adapter_name: str = "default",
    training_summary: Optional[dict] = None,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload adapter",
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    endpoint: Optional[str] = None,
    export: Optional[str] = EXPORT_LORA,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    datasets: Optional[list[str]] = None,
) -> str:
    """Save ``adapter_name`` (safetensors) with :func:`model_card` as README.md and push it to ``repo_id``; returns
    the commit URL. The Hub endpoint is ``endpoint``, by default ``HF_ENDPOINT`` as for every huggingface_hub call.

    With ``export="lora"`` (the default) the push also holds ``lora/``, the exact plain-LoRA export
    (:func:`~subspace_peft.export_lora`), which peft loads without this package (``subfolder="lora"``) and LoRA
    servers such as vLLM serve; the card says how, and with which maximum LoRA rank. ``export=None`` pushes the native
    adapter alone (needed where no exact LoRA exists, e.g. FLoRA on a grouped convolution).

    Every network operation of the push (connect, send, wait for the answer) waits at most ``timeout`` seconds, and
    each Hub request is attempted at most ``1 + max_retries`` times (on a timeout, a network error or HTTP
    408/429/5xx; 1, 2, 4, 8 ... seconds apart), huggingface_hub's own retries included. Past that, a
    :class:`HubUnreachableError` (a ValueError) names the endpoint and the fix. The adapter and its card are written
    (to a temporary folder) before the first request. Transfers through Xet storage (``hf_xet``) run under that
    library's own timeouts.

    ``base_model`` (a Hub model id) is written as the card's ``base_model`` and into the pushed adapter_config.json
    files; it is required when the adapter's ``base_model_name_or_path`` is a local folder, which nobody else could
    load. ``license`` (e.g. ``"apache-2.0"``) and ``datasets`` (Hub dataset ids) go into the card's metadata.

    Raises a ValueError before anything is written or sent if ``timeout`` is not a finite number > 0, ``max_retries``
    not an integer >= 0, ``repo_id`` not a valid repo id, the base model a local path with no ``base_model``, or the
    Hub turned off (``HF_HUB_OFFLINE=1``).
    """
    _check_timeouts(timeout, max_retries)
    choice("push_adapter", "export", export, (EXPORT_LORA, None))
    validate_repo_id(repo_id)  # an HFValidationError (a ValueError) naming the rule
    _check_card_fields(peft_model.peft_config[adapter_name], base_model, license, datasets)
    _check_online(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        source = folder if adapter_name == "default" else os.path.join(folder, adapter_name)
        rank = None
        config = peft_model.peft_config[adapter_name]
        if export == EXPORT_LORA and getattr(config, "residual_quantization", None):
            warnings.warn(
                "push_adapter: no lora/ export for a QPiSSA adapter: its LoRA form belongs on the quantised "
                "residual base, not on the original model that others load (pass export=None to silence)"
            )
        elif export == EXPORT_LORA and config.peft_type != LORA.peft_type:
            from .export import export_lora

            try:
                rank = _lora_rank(export_lora(peft_model, os.path.join(source, EXPORT_LORA), adapter_name))
            except ValueError as error:
                raise ValueError(f"push_adapter: {error} (or pass export=None to push the adapter alone)") from None
        if base_model is not None:
            _write_base_model(source, base_model)
        with open(os.path.join(source, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(
                model_card(
                    peft_model,
                    repo_id,
                    adapter_name,
                    training_summary,
                    exported_lora_rank=rank,
                    base_model=base_model,
                    license=license,
                    datasets=datasets,
                )
            )
        with _bounded_client(timeout, _Budget(max_retries)):
            _with_retries(
                lambda: api.create_repo(repo_id, private=private, exist_ok=True),
                f"create_repo('{repo_id}')",
                api.endpoint,
                timeout,
                max_retries,
            )
            info = _with_retries(
                lambda: api.upload_folder(repo_id=repo_id, folder_path=source, commit_message=commit_message),
                f"upload_folder('{repo_id}')",
                api.endpoint,
                timeout,
                max_retries,
            )
    return str(info)
