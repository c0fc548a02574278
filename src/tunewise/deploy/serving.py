"""`tunewise serve`: the serving engines in one table, each called with the same settings.

| engine    | where                        | what it runs                                                   |
|-----------|------------------------------|----------------------------------------------------------------|
| `builtin` | one machine, CPU or GPU      | server.py: OpenAI-compatible API, registry canary routes       |
| `vllm`    | GPU machines, real traffic   | vllm.py: `vllm serve` with every adapter (the current versions) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from tunewise.errors import TunewiseError


@dataclass(frozen=True)
class ServeSettings:
    base: str  # embedded name, folder or hub id
    adapters: dict[str, Path]  # name -> PEFT adapter folder, served besides the registry's routes
    registry: object | None  # a registry.Registry, or None (--no-registry)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # the environment variable holding the API key
    max_batch: int = 8
    trust_remote_code: bool = False


def api_key(settings: ServeSettings) -> str | None:
    """The API key from its environment variable; an error when the variable is named but empty."""
    if not settings.api_key_env:
        return None
    key = os.environ.get(settings.api_key_env)
    if not key:
        raise TunewiseError(f"the environment variable {settings.api_key_env} is empty", field="--api-key-env",
                            fix=f"export {settings.api_key_env}=<key> first")
    return key


def serve_builtin(settings: ServeSettings, console: Console) -> None:
    from tunewise.deploy.server import serve

    serve(settings.base, settings.adapters, registry=settings.registry, host=settings.host, port=settings.port,
          api_key=api_key(settings), max_batch=settings.max_batch, trust_remote_code=settings.trust_remote_code,
          console=console)


def serve_vllm(settings: ServeSettings, console: Console) -> None:
    """`vllm serve` with the given adapters and each registry name's current version (canary
    routes are the builtin server's); the command is also written to serve-vllm.sh."""
    from tunewise.deploy.vllm import run_vllm, vllm_command, write_script
    from tunewise.models import resolve_base

    api_key(settings)  # named but empty: refused before vLLM starts
    reg = settings.registry
    routed = {n: r.current for n, r in (reg.routes().items() if reg else []) if r.current is not None}
    adapters = settings.adapters | {n: reg.resolve(v.name, v.version).path for n, v in routed.items()}
    command = vllm_command(resolve_base(settings.base), adapters, host=settings.host, port=settings.port,
                           trust_remote_code=settings.trust_remote_code)
    script = write_script(command, Path("serve-vllm.sh").resolve(), settings.api_key_env)
    console.print(f"vLLM command (also in {script}):\n{' '.join(command)}")
    if routed:
        console.print("note: vLLM serves each registry name's current version; canary routes are tunewise serve's")
    run_vllm(command, script, settings.api_key_env)


ENGINES: dict[str, Callable[[ServeSettings, Console], None]] = {"builtin": serve_builtin, "vllm": serve_vllm}


def serve(engine: str, settings: ServeSettings, console: Console) -> None:
    """Serve with `engine` (a name in ENGINES) until Ctrl-C."""
    run = ENGINES.get(engine)
    if run is None:
        raise TunewiseError(f"unknown engine '{engine}'", field="--engine", fix=f"one of: {', '.join(ENGINES)}")
    run(settings, console)
