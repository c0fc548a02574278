"""Scale-out serving on vLLM: the `vllm serve` command for one base model and its LoRA adapters.

tunewise's own server is the default for one machine (CPU or a GPU, canary routes, /metrics);
vLLM is for GPU machines with real traffic (continuous batching, paged attention, multi-LoRA
kernels). The command is written to a script next to the adapters so it can be read, kept and
re-run; the API key is never written: vLLM reads it from VLLM_API_KEY at start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
from pathlib import Path

from tunewise.artifacts import weights_in
from tunewise.deploy.engine import check_adapter
from tunewise.errors import TunewiseError
from tunewise.runs import atomic_write_text


def lora_rank(folder: Path) -> int:
    return weights_in(folder).max_rank or 8


def vllm_command(base_path: Path, adapters: dict[str, Path], *, host: str, port: int, served_name: str = "base",
                 trust_remote_code: bool = False) -> list[str]:
    """`vllm serve` with --enable-lora and one --lora-modules entry per adapter (JSON form, which
    carries the parent model's name into /v1/models)."""
    folders = {name: check_adapter(name, path) for name, path in adapters.items()}
    command = ["vllm", "serve", str(base_path),
               "--served-model-name", served_name, "--host", host, "--port", str(port),
               "--generation-config", "auto"]
    if folders:
        rank = max(lora_rank(f) for f in folders.values())
        max_rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)  # vLLM's allowed values
        command += ["--enable-lora", "--max-loras", str(len(folders)), "--max-lora-rank", str(max_rank),
                    "--lora-modules"]
        command += [json.dumps({"name": n, "path": str(f.resolve()), "base_model_name": served_name})
                    for n, f in folders.items()]
    if trust_remote_code:
        command.append("--trust-remote-code")
    return command


def write_script(command: list[str], path: Path, api_key_env: str | None) -> Path:
    key = f'export VLLM_API_KEY="${{{api_key_env}:?set {api_key_env}}}"\n' if api_key_env else ""
    atomic_write_text(path, "#!/bin/sh\n# written by `tunewise serve --engine vllm`\n" + key
                      + "exec " + " ".join(shlex.quote(c) for c in command) + "\n")
    path.chmod(0o755)
    return path


def run_vllm(command: list[str], script: Path, api_key_env: str | None) -> None:
    """Replace this process with vLLM (it handles Ctrl-C and signals itself)."""
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise TunewiseError(
            f"vLLM is not installed here; the command is written to {script}",
            fix="on a GPU machine: pip install vllm, then run that script (or tunewise serve --engine vllm again)",
        )
    env = dict(os.environ)
    if api_key_env:
        if not env.get(api_key_env):
            raise TunewiseError(f"the environment variable {api_key_env} is empty", field="--api-key-env",
                                fix=f"export {api_key_env}=<key>, or leave --api-key-env out for no key")
        env["VLLM_API_KEY"] = env[api_key_env]
    os.execvpe(shutil.which("vllm"), command, env)
