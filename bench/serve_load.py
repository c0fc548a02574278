"""Load test of tunewise serve on loopback: N concurrent clients, a bounded time, 3 adapters.

Run: .venv/bin/python bench/serve_load.py [--clients 12] [--seconds 60] [--max-tokens 32]
         [--stream-fraction 0.25] [--max-batch 8] [--rounds 1] [--adapter name=folder ...]

The server runs in its own process (tunewise's `create_app` under uvicorn, on a free loopback
port, behind a bearer key), started once per phase. A phase is one server setting under the same
load: `--max-batch` (default 8: queued requests that share an adapter run as one batch) and, for
comparison, `--max-batch 1` (one request per forward pass); `--rounds R` alternates them R times
(A B A B ...) so drift on a shared CPU hits both. Each client is a thread with its own `openai`
client, sending chat completions back to back until the time is up, round-robin across the
adapters; a seeded share of them streams (with usage, to count tokens and time the first one).
Prompts are the Debian task's: its system prompt and a package's name and description.

Without --adapter, three LoRA adapters are made on the base (PEFT, r=16 on q/k/v/o, random
non-zero B, a different seed each, so each answers differently). Reported per setting:
requests, errors by kind, requests/s and generated tokens/s (over the phase, drain included),
p50/p95/max latency, time to first token of streamed requests, the server's batch sizes from
its /metrics (tunewise_batch_size), and whether the server was alive at the end and exited
cleanly on SIGINT. Target: zero errors, no crash. Exit status 1 when that is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
BUCKETS = (1, 2, 4, 8, 16, 32)  # tunewise_batch_size's histogram buckets

CHILD = """
import json, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch, uvicorn
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
from tunewise.deploy import create_app
app = create_app(spec["base"], {k: Path(v) for k, v in spec["adapters"].items()}, api_key=spec["key"],
                 max_batch=spec["max_batch"])
uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning", access_log=False)
"""


# ---- adapters and prompts -------------------------------------------------------------------------


def make_adapters(base: Path, out: Path, count: int, scale: float) -> dict[str, Path]:
    """`count` LoRA adapters (r=16, q/k/v/o) on `base`, each with its own random non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunewise.models import load_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(load_model(base), config)
    adapters = {}
    for n in range(count):
        torch.manual_seed(n + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(param, a=5 ** 0.5)
                elif "lora_B" in name:
                    param.normal_(0.0, scale)
        name = f"lora{n + 1}"
        model.save_pretrained(out / name)
        adapters[name] = out / name
    return adapters


def load_prompts() -> list[list[dict]]:
    """The Debian task's chat prompts: its system prompt, then one package per prompt."""
    import tunewise
    from tunewise.config import load_config

    task = Path(tunewise.__file__).parent / "examples" / "debian-sections"
    system = load_config(task / "tunewise.yaml").task.system_prompt
    rows = [json.loads(line) for line in (task / "packages.jsonl").read_text().splitlines() if line.strip()]
    users = [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]
    return [[{"role": "system", "content": system}, {"role": "user", "content": u}] for u in users]


# ---- the server process ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """tunewise serve in a child process; its log goes to a file."""

    def __init__(self, base: str, adapters: dict[str, Path], max_batch: int, threads: int | None, log: Path):
        self.port, self.log = free_port(), log
        spec = {"base": base, "adapters": {k: str(v) for k, v in adapters.items()}, "key": KEY,
                "max_batch": max_batch, "port": self.port, "threads": threads}
        path = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}) while starting:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.proc.kill()
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{self.tail()}")

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()

    def stop(self, timeout: float = 30) -> tuple[bool, int | None]:
        """(alive before the stop, exit status after SIGINT; None if it had to be killed)."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGINT)
        try:
            return alive, self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return alive, None

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")


def log_tail(log: Path, lines: int) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def batch_sizes(metrics: str) -> Counter:
    """tunewise_batch_size, all versions together: batches per bucket ('1', '2', '3-4', '5-8', ...)."""
    cumulative: Counter = Counter()
    for match in re.finditer(r'^tunewise_batch_size_bucket\{([^}]*)\} ([0-9.e+]+)$', metrics, re.M):
        le = re.search(r'le="([^"]+)"', match.group(1)).group(1)
        cumulative[le] += float(match.group(2))
    edges = [(str(float(b)), b) for b in BUCKETS]
    out, below, low = Counter(), 0.0, 1
    for key, high in edges:
        count = cumulative.get(key, 0.0) - below
        if count:
            out["1" if high == 1 else f"{low}-{high}" if low != high else str(high)] = int(count)
        below, low = cumulative.get(key, below), high + 1
    if cumulative.get("+Inf", 0.0) > below:
        out[f">{BUCKETS[-1]}"] = int(cumulative["+Inf"] - below)
    return out


def metric_sum(metrics: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", metrics, re.M))


# ---- the clients --------------------------------------------------------------------------------------


@dataclass
class Result:
    adapter: str
    stream: bool
    seconds: float
    tokens: int = 0
    first: float | None = None  # seconds to the first content token (streamed requests)
    error: str | None = None


@dataclass
class Phase:
    max_batch: int
    seconds: float = 0.0
    results: list[Result] = field(default_factory=list)
    batches: Counter = field(default_factory=Counter)
    batch_count: float = 0.0
    batch_sum: float = 0.0
    alive: bool = True
    exit_status: int | None = 0
    tracebacks: int = 0


def error_kind(err: Exception) -> str:
    import openai

    if isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection"
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}"
    if isinstance(err, openai.APIError):
        return "error in stream"
    return type(err).__name__


def one_request(api, adapter: str, messages: list[dict], stream: bool, max_tokens: int) -> Result:
    started = time.perf_counter()
    result = Result(adapter, stream, 0.0)
    try:
        if stream:
            chunks = api.chat.completions.create(model=adapter, messages=messages, max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True})
            finished = False
            for chunk in chunks:
                if chunk.usage is not None:
                    result.tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content and result.first is None:
                        result.first = time.perf_counter() - started
                    finished = finished or choice.finish_reason is not None
            if not finished:
                result.error = "stream ended without finish_reason"
        else:
            reply = api.chat.completions.create(model=adapter, messages=messages, max_tokens=max_tokens)
            if not reply.choices or reply.choices[0].finish_reason not in ("stop", "length"):
                result.error = "bad response"
            result.tokens = reply.usage.completion_tokens if reply.usage else 0
    except Exception as err:  # noqa: BLE001 - every failure is counted by kind
        result.error = error_kind(err)
    result.seconds = time.perf_counter() - started
    return result


def run_load(url: str, adapters: list[str], prompts: list[list[dict]], *, clients: int, seconds: float,
             max_tokens: int, stream_fraction: float, seed: int, timeout: float) -> tuple[list[Result], float]:
    """Closed loop: each client sends its next request when the last one is answered, until `seconds`
    are up; requests in flight then finish and count. Returns the results and the wall time."""
    import openai

    counter, lock = itertools.count(), threading.Lock()
    results: list[Result] = []
    started = time.perf_counter()
    stop_at = started + seconds

    def client(index: int) -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=timeout)
        rng = random.Random(seed * 1000 + index)
        mine = []
        while time.perf_counter() < stop_at:
            with lock:
                n = next(counter)
            mine.append(one_request(api, adapters[n % len(adapters)], prompts[rng.randrange(len(prompts))],
                                    rng.random() < stream_fraction, max_tokens))
        api.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


# ---- one phase: start, warm up, load, scrape, stop -----------------------------------------------------


def run_phase(args, adapters: dict[str, Path], prompts, max_batch: int, log: Path, console: Console) -> Phase:
    phase = Phase(max_batch)
    console.print(f"[bold]max-batch {max_batch}[/]: starting the server ...", end=" ")
    server = Server(args.base, adapters, max_batch, args.threads, log)
    try:
        server.wait_healthy(args.start_timeout)
        import openai

        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=args.timeout)
        try:
            for name in adapters:  # warm-up, not counted
                api.chat.completions.create(model=name, messages=prompts[0], max_tokens=2)
        except openai.APIError as err:
            raise RuntimeError(f"the warm-up request failed ({error_kind(err)}: {err}):\n{server.tail()}") from None
        api.close()
        before = server.get("/metrics")
        console.print(f"up on {server.url}; {args.clients} clients for {args.seconds:g} s ...", end=" ")
        phase.results, phase.seconds = run_load(
            server.url, list(adapters), prompts, clients=args.clients, seconds=args.seconds,
            max_tokens=args.max_tokens, stream_fraction=args.stream_fraction, seed=args.seed, timeout=args.timeout)
        try:
            after = server.get("/metrics")
        except OSError as err:  # the server died under load: the report says so
            console.print(f"[red]/metrics failed after the load: {err}[/]")
            after = before
        phase.batches = batch_sizes(after) - batch_sizes(before)
        count, total = "tunewise_batch_size_count", "tunewise_batch_size_sum"
        phase.batch_count = metric_sum(after, count) - metric_sum(before, count)
        phase.batch_sum = metric_sum(after, total) - metric_sum(before, total)
    finally:
        phase.alive, phase.exit_status = server.stop()
        phase.tracebacks = server.tracebacks()
    errors = sum(r.error is not None for r in phase.results)
    console.print(f"{len(phase.results)} requests, {errors} errors")
    return phase


# ---- report ---------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def merge(phases: list[Phase]) -> Phase:
    out = Phase(phases[0].max_batch)
    for p in phases:
        out.seconds += p.seconds
        out.results += p.results
        out.batches += p.batches
        out.batch_count += p.batch_count
        out.batch_sum += p.batch_sum
        out.alive = out.alive and p.alive
        out.exit_status = p.exit_status if out.exit_status == 0 else out.exit_status
        out.tracebacks += p.tracebacks
    return out


def report(merged: list[Phase], console: Console) -> bool:
    table = Table(title="tunewise serve under load (latency and time to first token in ms)")
    for col in ("max batch", "seconds", "requests", "errors", "req/s", "gen tok/s", "tok/req", "p50", "p95", "max",
                "TTFT p50", "TTFT p95", "mean batch", "server"):
        table.add_column(col, justify="right")
    ok = True
    for p in merged:
        good = [r for r in p.results if r.error is None]
        errors = len(p.results) - len(good)
        lat = [r.seconds for r in good]
        ttft = [r.first for r in good if r.stream and r.first is not None]
        tokens = sum(r.tokens for r in good)
        clean = p.alive and p.exit_status == 0 and p.tracebacks == 0
        ok = ok and clean and errors == 0 and bool(good)
        server = ("alive, exit 0" if clean else
                  f"{'alive' if p.alive else 'DEAD'}, exit {p.exit_status}, {p.tracebacks} tracebacks")
        table.add_row(str(p.max_batch), f"{p.seconds:.1f}", str(len(p.results)), f"[red]{errors}[/]" if errors else "0",
                      f"{len(good) / p.seconds:.2f}" if p.seconds else "-",
                      f"{tokens / p.seconds:.1f}" if p.seconds else "-",
                      f"{tokens / len(good):.1f}" if good else "-",
                      ms(pct(lat, 0.5)), ms(pct(lat, 0.95)), ms(max(lat, default=None)),
                      ms(pct(ttft, 0.5)), ms(pct(ttft, 0.95)),
                      f"{p.batch_sum / p.batch_count:.2f}" if p.batch_count else "-",
                      server if clean else f"[red]{server}[/]")
    console.print(table)

    labels = ["1", "2", "3-4", "5-8", "9-16", "17-32", ">32"]
    used = [label for label in labels if any(p.batches.get(label) for p in merged)]
    sizes = Table(title="batches run by the server, by size (tunewise_batch_size)")
    sizes.add_column("max batch", justify="right")
    for label in used:
        sizes.add_column(label, justify="right")
    sizes.add_column("batches", justify="right")
    sizes.add_column("requests in batches >1", justify="right")
    for p in merged:
        total = sum(p.batches.values())
        in_big = p.batch_sum - p.batches.get("1", 0)
        sizes.add_row(str(p.max_batch), *[str(p.batches.get(label, 0)) for label in used], str(total),
                      f"{in_big / p.batch_sum:.0%}" if p.batch_sum else "-")
    console.print(sizes)

    per = Table(title="per adapter and kind (latency p50 / p95 in ms)")
    per.add_column("max batch", justify="right")
    per.add_column("adapter")
    per.add_column("requests", justify="right")
    per.add_column("streamed", justify="right")
    per.add_column("p50", justify="right")
    per.add_column("p95", justify="right")
    for p in merged:
        for name in sorted({r.adapter for r in p.results}):
            rows = [r for r in p.results if r.adapter == name]
            lat = [r.seconds for r in rows if r.error is None]
            per.add_row(str(p.max_batch), name, str(len(rows)), str(sum(r.stream for r in rows)),
                        ms(pct(lat, 0.5)), ms(pct(lat, 0.95)))
    console.print(per)

    kinds = Counter((p.max_batch, r.error) for p in merged for r in p.results if r.error)
    if kinds:
        errs = Table(title="errors by kind")
        errs.add_column("max batch", justify="right")
        errs.add_column("kind")
        errs.add_column("count", justify="right")
        for (batch, kind), count in kinds.most_common():
            errs.add_row(str(batch), kind, str(count))
        console.print(errs)

    if len(merged) == 2 and all(p.seconds and p.results for p in merged):
        a, b = merged
        rate = lambda p: sum(r.error is None for r in p.results) / p.seconds  # noqa: E731
        p50 = lambda p: pct([r.seconds for r in p.results if r.error is None], 0.5) or float("nan")  # noqa: E731
        if rate(b):
            console.print(f"max-batch {a.max_batch} vs {b.max_batch}: {rate(a) / rate(b):.2f}x the requests/s, "
                          f"p50 latency {p50(a) / p50(b):.2f}x")
    return ok


# ---- main ----------------------------------------------------------------------------------------------


def parse_adapter(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"'{text}': write name=folder, e.g. sections=runs/<run>/adapter")
    return name, Path(folder).expanduser()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60,
                        help="load time per phase (requests in flight then finish)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--stream-fraction", type=float, default=0.25, help="share of requests that stream")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's max batch under test")
    parser.add_argument("--no-compare", action="store_true", help="skip the --max-batch 1 phase")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two settings this many times")
    parser.add_argument("--base", default="smollm2-135m-instruct", help="base model (embedded name or folder)")
    parser.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=FOLDER",
                        help="serve this adapter (repeatable); default: 3 random LoRA adapters on the base")
    parser.add_argument("--lora-scale", type=float, default=0.02, help="std of the random adapters' B matrices")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the server (None: torch's default)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a request counts as timed out")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and which requests stream")
    args = parser.parse_args(argv)
    console = Console()
    if console.width < 160:  # a pipe or a narrow terminal: wide tables rather than cut columns
        console = Console(width=160)
    warnings.filterwarnings("ignore", category=FutureWarning)

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(
        str(ROOT)) else sys.executable, os.path.relpath(__file__, ROOT) if __file__.startswith(str(ROOT)) else __file__,
        *(sys.argv[1:] if argv is None else argv)])
    console.print(f"re-run: [bold]{command}[/]")

    from tunewise.models import resolve_base

    base_path = resolve_base(args.base)
    prompts = load_prompts()
    settings = [args.max_batch] + ([] if args.no_compare or args.max_batch == 1 else [1])
    with tempfile.TemporaryDirectory(prefix="tunewise-serve-load-") as tmp:
        work = Path(tmp)
        if args.adapter:
            adapters = dict(args.adapter)
        else:
            console.print(f"making 3 LoRA adapters (r=16, q/k/v/o, B ~ N(0, {args.lora_scale:g})) on {args.base} ...")
            adapters = make_adapters(base_path, work / "adapters", 3, args.lora_scale)
        console.print(f"base {args.base}; adapters {', '.join(adapters)}; {len(prompts)} prompts; "
                      f"{args.clients} clients; {args.seconds:g} s per phase; max_tokens {args.max_tokens}; "
                      f"{args.stream_fraction:.0%} streamed; settings: max-batch {' vs '.join(map(str, settings))}"
                      f" x {args.rounds} round(s); torch threads in the server: {args.threads or 'default'}; "
                      f"{os.cpu_count()} CPUs")
        phases: dict[int, list[Phase]] = {s: [] for s in settings}
        log = work / "server.log"
        try:
            for _ in range(args.rounds):
                for setting in settings:
                    phases[setting].append(run_phase(args, adapters, prompts, setting, log, console))
        except RuntimeError as err:
            console.print(f"[red]error:[/] {err}")
            return 1
        ok = report([merge(phases[s]) for s in settings], console)
        if ok:
            console.print("[green]target met[/]: zero errors, the server stayed up and exited cleanly")
        else:
            console.print("[red]target missed[/] (zero errors, server alive and exiting 0); the server log ends:")
            console.print(log_tail(log, 40) if log.exists() else "(no log)", markup=False, highlight=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
