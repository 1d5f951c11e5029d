"""Benchmark: `corral serve` (continuous batching) against one-request-at-a-time transformers serving.

    python bench/serve.py

Two servers, each in its own process, measured one after the other on the same model and prompts:

  corral serve          Corral's server and engine: requests share one batch and KV cache
  transformers serial   a minimal OpenAI-style streaming server in this file that answers one
                        request at a time with `model.generate` + `TextIteratorStreamer` behind a
                        lock: what a FastChat model worker does without vLLM

For each level of concurrency (`--clients`, default 1,4,16) that many async HTTP clients pull
requests from one queue of prompts (the user turns of Corral's identity data, rendered with the
model's chat template by each server) and stream the replies. Decoding is greedy with repetition
penalty 1.1 and `--max-tokens` new tokens at most, identical in both servers, so both produce the
same tokens. Per level: output tokens/s over the level's wall time (tokens counted by the server's
usage report), time to first token (request sent -> first content chunk) p50/p95, and request
latency p50. Peak RSS is each server process's VmHWM at the end.

`--ref REF` also measures Corral's server as of git revision REF (a temporary worktree), right after
this checkout's, so a change's throughput cost is a ratio measured in one run. `--json-schema`
adds rows where every request carries a JSON schema (`response_format` json_schema, decoded under
xgrammar's token masks), and an in-process measurement of the mask's cost per token: the time to
fill and apply one row's mask on the model's vocabulary, alone and for 16 rows.

Yardsticks without a server (`--static`, `--gguf LABEL=FILE`), each in a fresh process on the same
prompts as token ids under the chat template, greedy with the same penalty: transformers `generate`
on static batches of 1 and of the largest client count (left-padded, all rows of a batch started
together; in float32, or each dtype of `--static-dtype`), and llama.cpp on a GGUF file through
llama-cpp-python's C API (`pip install 'corral[llamacpp]'`), one `llama_decode` per step for every
unfinished sequence of the batch, as llama.cpp's own server batches its slots (llama-cpp-python's server answers one request at a time,
so 16 clients through it measure its batch of 1). `--llamacpp-build LABEL=DIR` repeats those rows
with another build of llama-cpp-python (a `pip install --target DIR` folder). `--variant
LABEL=ARGS` also measures this checkout's server with other `corral serve` arguments (e.g.
`bf16=dtype=bfloat16`), `--serve-arg` gives the main one arguments.

`--repeat N` runs everything N times in rounds and reports each row's median and each ratio's median
over the rounds (this machine's speed drifts over a long run: a ratio of rows measured within one
round is the steadier figure); `--no-serial` leaves the serial server out.

Writes bench/results/serve.json (serve-<gpu>.json on CUDA) atomically; `python bench/report.py`
puts the table in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's corral, installed or not

from bench.common import machine_info, results_path, versions, write_results  # noqa: E402

MODEL = "smollm2-135m"
REPETITION_PENALTY = 1.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply at most (default 64)")
    p.add_argument("--min-requests", type=int, default=8,
                   help="requests per level: max(this, 2 x clients) (default 8)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--ref", default=None, help="also measure corral serve at this git revision (e.g. HEAD~1)")
    p.add_argument("--json-schema", action="store_true", help="add json_schema rows and the mask's cost per token")
    p.add_argument("--out", default=None, help="results file (default bench/results/serve[-gpu].json)")
    p.add_argument("--static", action="store_true",
                   help="add transformers `generate` static batches of 1 and of the largest client count")
    p.add_argument("--gguf", action="append", default=[], metavar="LABEL=PATH",
                   help="add llama.cpp static batches on this GGUF file (llama-cpp-python, the `llamacpp` extra)")
    p.add_argument("--llamacpp-build", action="append", default=[], metavar="LABEL=DIR",
                   help="run the llama.cpp rows with the llama-cpp-python found in DIR (a pip --target folder), "
                        "once per build; default: the installed one")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `corral serve` argument for this checkout's server (e.g. dtype=float32)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=ARG[,ARG]",
                   help="also measure this checkout's server with these `corral serve` arguments instead "
                        "(e.g. bf16=dtype=bfloat16), right after the main one")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the static rows (default torch's)")
    p.add_argument("--static-dtype", default="float32",
                   help="dtypes of the `generate` static rows, comma-separated (default float32; e.g. float32,bfloat16)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every row this many times, in rounds (each round all rows, one after the other), and "
                        "report each row's median and the median of each ratio over the rounds (default 1)")
    p.add_argument("--no-serial", action="store_true",
                   help="leave out the one-request-at-a-time transformers server (and the corral/serial ratios)")
    p.add_argument("--static-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The baseline: one request at a time through transformers' generate


def baseline_server(model_name: str, port: int) -> None:
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import TextIteratorStreamer

    from corral.chat.conversation import Conversation, Message
    from corral.chat.templates import get_template
    from corral.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    fmt = get_template("auto", tokenizer)
    model = load_model(model_name)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        conversation = Conversation([Message(m["role"], m["content"]) for m in body["messages"]])
        prompt = torch.tensor([fmt.render(conversation)])
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        produced = {}

        def work():
            with lock, torch.no_grad():  # one request at a time: the others queue here
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), streamer=streamer,
                                     max_new_tokens=body["max_tokens"], do_sample=False,
                                     repetition_penalty=body.get("repetition_penalty", 1.0),
                                     eos_token_id=fmt.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
            produced["tokens"] = out.shape[1] - prompt.shape[1]

        thread = threading.Thread(target=work)
        thread.start()

        async def events():
            iterator = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, iterator, None)
                if piece is None:
                    break
                if piece:
                    yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n"
            await asyncio.to_thread(thread.join)
            usage = {"completion_tokens": produced["tokens"]}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------
# Static batches: the yardsticks without a server (each in its own process, one after the other)


def render_prompts(model_name: str, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each user turn under the model's chat template (as both servers render them), and the stops."""
    from corral.chat.conversation import Conversation, Message
    from corral.chat.templates import get_template
    from corral.models.load import load_tokenizer

    fmt = get_template("auto", load_tokenizer(model_name))
    return [fmt.render(Conversation([Message("user", t)])) for t in texts], list(fmt.stop_token_ids)


def generate_static(model_name: str, ids: list[list[int]], batch: int, max_tokens: int,
                    dtype: str = "float32") -> dict:
    """transformers `generate` on batches of `batch` prompts, left-padded, greedy, repetition penalty 1.1."""
    import torch

    from corral.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype)
    _, stops = render_prompts(model_name, [])
    pad = tokenizer.pad_token_id

    def run(group):
        width = max(map(len, group))
        prompt = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 repetition_penalty=REPETITION_PENALTY, eos_token_id=stops, pad_token_id=pad)
        replies = out[:, width:].tolist()
        return sum(next((i + 1 for i, t in enumerate(r) if t in stops), len(r)) for r in replies)

    run(ids[:batch])  # warm-up, not timed
    started = time.perf_counter()
    tokens = sum(run(ids[i:i + batch]) for i in range(0, len(ids), batch))
    return {"tokens": tokens, "wall_s": time.perf_counter() - started}


def llamacpp_static(gguf: str, ids: list[list[int]], stops: list[int], batch: int, max_tokens: int,
                    threads: int) -> dict:
    """llama.cpp (through llama-cpp-python's C API) on batches of `batch` prompts: one llama_decode per step
    for every unfinished sequence of the batch (each its own seq_id), as llama.cpp's own server batches its
    slots; greedy with transformers' repetition penalty 1.1 (over prompt and reply) applied to its logits."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
    longest = max(map(len, ids)) + max_tokens
    params = L.llama_context_default_params()
    params.n_ctx = batch * longest
    params.n_batch = max(batch * longest, 512)
    params.n_ubatch = 512
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx = L.llama_init_from_model(model, params)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    chunk = L.llama_batch_init(params.n_batch, 0, batch)

    def decode(entries):  # [(token, position, sequence, wants logits)]
        for i, (token, pos, seq, logits) in enumerate(entries):
            chunk.token[i], chunk.pos[i], chunk.n_seq_id[i] = token, pos, 1
            chunk.seq_id[i][0], chunk.logits[i] = seq, logits
        chunk.n_tokens = len(entries)
        if L.llama_decode(ctx, chunk) != 0:
            raise RuntimeError("llama_decode failed")

    def run(group):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, t in enumerate(p)])
        ends = [sum(map(len, group[: s + 1])) - 1 for s in range(len(group))]
        rows = dict(enumerate(ends))  # sequence -> the index of its logits in the last batch
        seen = [np.zeros(vocab, dtype=bool) for _ in group]
        for s, p in enumerate(group):
            seen[s][p] = True
        made = [0] * len(group)
        while rows:
            entries = []
            for s, row in rows.items():
                logits = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, row),
                                                           ctypes.POINTER(ctypes.c_float)), shape=(vocab,))
                penalised = np.where(logits > 0, logits / REPETITION_PENALTY, logits * REPETITION_PENALTY)
                token = int(np.argmax(np.where(seen[s], penalised, logits)))
                seen[s][token] = True
                made[s] += 1
                if token not in stops and made[s] < max_tokens:
                    entries.append((token, len(group[s]) + made[s] - 1, s, True))
            rows = {s: i for i, (_, _, s, _) in enumerate(entries)}
            if entries:
                decode(entries)
        return sum(made)

    run(ids[:batch])  # warm-up, not timed
    started = time.perf_counter()
    tokens = sum(run(ids[i:i + batch]) for i in range(0, len(ids), batch))
    return {"tokens": tokens, "wall_s": time.perf_counter() - started}


def static_worker(args) -> None:
    """In a fresh process: one static measurement, printed as one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    count = max(args.min_requests, 2 * args.batch)
    ids, stops = render_prompts(args.model, prompts()[:count])
    if args.static_worker == "generate":
        result = generate_static(args.model, ids, args.batch, args.max_tokens, args.static_dtype)
    else:
        result = llamacpp_static(args.static_worker, ids, stops, args.batch, args.max_tokens,
                                 args.threads or torch.get_num_threads())
    print(json.dumps({**result, "requests": len(ids)}))


def measure_static(name: str, worker: str, batch: int, args, pythonpath: str | None = None,
                   dtype: str = "float32") -> dict:
    import os

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--static-worker", worker, "--batch", str(batch), "--model", args.model,
           "--max-tokens", str(args.max_tokens), "--min-requests", str(args.min_requests),
           "--static-dtype", dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    row = {"name": f"{name} @{batch}", "requests": result["requests"], "output_tokens": result["tokens"],
           "wall_s": round(result["wall_s"], 2), "tokens_per_s": round(result["tokens"] / result["wall_s"], 2)}
    print(f"  {row['name']:30s}: {row['tokens_per_s']:7.1f} tok/s ({row['requests']} requests)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# Clients


def prompts() -> list[str]:
    from corral.data.formats import read_conversations

    conversations, _ = read_conversations("builtin:corral_identity")
    seen: dict[str, None] = {}
    for conv in conversations:
        for m in conv.turns:
            if m.role == "user":
                seen.setdefault(m.content)
    return list(seen)


SCHEMA = {  # what a judge or an extraction asks for: an enum, a bounded integer, a short string list
    "type": "object", "additionalProperties": False, "required": ["topic", "rating", "keywords"],
    "properties": {"topic": {"enum": ["identity", "capabilities", "training", "other"]},
                   "rating": {"type": "integer", "minimum": 1, "maximum": 10},
                   "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}},
}  # fmt: skip


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "repetition_penalty": REPETITION_PENALTY,
            "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
    sent = time.perf_counter()
    first, tokens, text = None, 0, ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    first = first or time.perf_counter()
                    text += choice["delta"]["content"]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "latency": done - sent, "tokens": tokens, "text": text}


async def run_level(url: str, model: str, clients: int, requests: list[str], max_tokens: int,
                    extra: dict | None = None) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in requests:
        queue.put_nowait(p)
    results = []

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append({"prompt": prompt, **await one_request(client, url, model, prompt, max_tokens, extra)})

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients, "requests": len(results), "output_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
        "replies": {r["prompt"]: r["text"] for r in results},
    }


def start_server(cmd: list[str], port: int, cwd: Path | None = None) -> subprocess.Popen:
    """`cmd` in `cwd` (where `python -m corral.cli` finds its corral first: another checkout's)."""
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}\n{proc.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(" ".join(cmd))


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory the process `pid` holds now, from nvidia-smi (None without a GPU or nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(mb) for line in out.splitlines() if "," in line for p, mb in [line.split(",", 1)] if int(p) == pid]
    return sum(used) if used else None


def measure(name: str, cmd: list[str], port: int, model: str, args, pool: list[str], extra: dict | None = None,
            cwd: Path | None = None) -> dict:
    proc = start_server(cmd, port, cwd)
    url = f"http://127.0.0.1:{port}"
    gpu: list[float] = []
    try:
        # Warm-up, not recorded: one request, then two at once (a `compile=true` server builds its graphs for
        # 1- and 2-row steps here, the only ones it compiles, rather than inside a timed level).
        asyncio.run(run_level(url, model, 1, pool[:1], args.max_tokens, extra))
        asyncio.run(run_level(url, model, 2, pool[:2], args.max_tokens, extra))
        levels = []
        for clients in [int(c) for c in args.clients.split(",")]:
            count = max(args.min_requests, 2 * clients)
            level = asyncio.run(run_level(url, model, clients, pool[:count], args.max_tokens, extra))
            print(f"  {name:22s} clients {clients:3d}: {level['tokens_per_s']:7.1f} tok/s, "
                  f"TTFT p50 {level['ttft_p50_s']:.2f}s p95 {level['ttft_p95_s']:.2f}s "
                  f"({level['requests']} requests, {level['wall_s']:.0f}s)", flush=True)
            levels.append(level)
            # After each level: torch's caching allocator keeps what the level reserved, so this holds its peak.
            if (used := gpu_memory_mb(proc.pid)) is not None:
                gpu.append(used)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"name": name, "levels": levels, "peak_rss_mb": rss, **({"peak_gpu_mb": max(gpu)} if gpu else {})}


def level_rows(measured: dict) -> list[dict]:
    return [{"name": f"{measured['name']} @{level['clients']}",
             **{k: v for k, v in level.items() if k not in ("replies", "clients")},
             "peak_rss_mb": measured["peak_rss_mb"],
             **({"peak_gpu_mb": measured["peak_gpu_mb"]} if "peak_gpu_mb" in measured else {})}
            for level in measured["levels"]]  # fmt: skip


def valid_reply(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


class reference_checkout:
    """A temporary git worktree of REF (removed afterwards): (its folder, a label naming the commit)."""

    def __init__(self, ref: str):
        self.ref = ref

    def __enter__(self):
        import tempfile

        commit = subprocess.run(["git", "rev-parse", "--short", self.ref], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        self.folder = Path(tempfile.mkdtemp(prefix="corral-ref-")) / commit
        subprocess.run(["git", "worktree", "add", "--detach", str(self.folder), commit], cwd=REPO, check=True,
                       capture_output=True)
        return self.folder, f"@{commit}"

    def __exit__(self, *exc):
        subprocess.run(["git", "worktree", "remove", "--force", str(self.folder)], cwd=REPO, capture_output=True)


def mask_cost_per_token(model: str, steps: int = 200) -> dict:
    """Milliseconds to fill and apply json_schema masks for 1 and 16 rows, per decode step, in this process."""
    import torch

    from corral.generate.structured import Grammars, ResponseFormat
    from corral.models.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    width = len(tokenizer)
    grammars = Grammars(tokenizer, width)
    fmt = ResponseFormat.json_schema(SCHEMA)
    cost = {"vocab": width}
    for rows in (1, 16):
        matchers = [grammars.matcher(fmt, frozenset({tokenizer.eos_token_id})) for _ in range(rows)]
        logits = torch.randn(rows, width)
        started = time.perf_counter()
        for _ in range(steps):
            grammars.apply(logits, matchers)  # the first state's mask, re-filled each step as in decoding
        cost[f"ms_per_step_{rows}_rows"] = round((time.perf_counter() - started) / steps * 1000, 3)
    print(f"  json_schema mask: {cost}", flush=True)
    return cost


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.static_worker:
        static_worker(args)
        return 0
    if args.baseline_server:
        baseline_server(args.model, args.port)
        return 0
    if args.repeat > 1:
        return repeated(args, list(argv if argv is not None else sys.argv[1:]))
    pool = prompts()
    print(f"serving benchmark on {args.model}: clients {args.clients}, max {args.max_tokens} new tokens, greedy")
    corral_port, base_port = free_port(), free_port()
    serve = [sys.executable, "-m", "corral.cli", "serve", "--model", f"m={args.model}", "--port"]
    ours = [*serve[:-1], *args.serve_arg, "--port"]  # this checkout's server, with its extra arguments
    corral = measure("corral serve", ours + [str(corral_port)], corral_port, "m", args, pool)
    extra_rows, extra_ratios, mask_cost = [], {}, None
    servers = {"corral": corral}  # this checkout's servers, each compared with the static rows below
    for variant in args.variant:
        label, variant_args = variant.split("=", 1)
        port = free_port()
        other = measure(f"corral serve {label}", [*serve[:-1], *variant_args.split(","), "--port", str(port)], port,
                        "m", args, pool)
        extra_rows += level_rows(other)
        servers[f"corral {label}"] = other
        for now, then in zip(other["levels"], corral["levels"]):
            extra_ratios[f"corral {label}/corral tokens_per_s @{now['clients']}"] = round(
                now["tokens_per_s"] / then["tokens_per_s"], 2)
    if args.ref:
        with reference_checkout(args.ref) as (folder, label):
            port = free_port()
            ref = measure(f"corral serve {label}", serve + [str(port)], port, "m", args, pool, cwd=folder)
        extra_rows += level_rows(ref)
        for now, then in zip(corral["levels"], ref["levels"]):
            extra_ratios[f"corral/corral {label} tokens_per_s @{now['clients']}"] = round(
                now["tokens_per_s"] / then["tokens_per_s"], 2)
    if args.json_schema:
        port = free_port()
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA}}}
        constrained = measure("corral serve json_schema", ours + [str(port)], port, "m", args, pool, extra)
        extra_rows += level_rows(constrained)
        for free, schema_level in zip(corral["levels"], constrained["levels"]):
            extra_ratios[f"json_schema/free tokens_per_s @{free['clients']}"] = round(
                schema_level["tokens_per_s"] / free["tokens_per_s"], 2)
        invalid = sum(not valid_reply(text) for level in constrained["levels"] for text in level["replies"].values())
        extra_ratios["json_schema replies failing the schema"] = invalid
        mask_cost = mask_cost_per_token(args.model)
    baseline = None if args.no_serial else measure(
        "transformers serial", [sys.executable, __file__, "--baseline-server", "--model", args.model, "--port",
                                str(base_port)], base_port, "m", args, pool)

    static_rows = []
    top = max(int(c) for c in args.clients.split(","))
    if args.static:
        for dtype in args.static_dtype.split(","):
            name = "transformers generate static" + ("" if dtype == "float32" else f" {dtype}")
            static_rows += [measure_static(name, "generate", b, args, dtype=dtype) for b in (1, top)]
    builds = [b.split("=", 1) for b in args.llamacpp_build] or [("", None)]
    for label_path in args.gguf:
        label, path = label_path.split("=", 1)
        for build, folder in builds:
            name = f"llama.cpp {label}" + (f" {build}" if build else "") + " static"
            static_rows += [measure_static(name, path, b, args, folder) for b in (1, top)]
    for server, measured in servers.items():
        by_clients = {level["clients"]: level["tokens_per_s"] for level in measured["levels"]}
        for row in static_rows:
            batch = int(row["name"].rsplit("@", 1)[1])
            if batch in by_clients:
                what = row["name"].rsplit(" @", 1)[0]  # e.g. "transformers generate static bfloat16"
                extra_ratios[f"{server} @{batch} clients / {what} batch of {batch}"] = round(
                    by_clients[batch] / row["tokens_per_s"], 2)
    extra_rows += static_rows

    rows, ratios, mismatched = [], {}, 0
    for c_level, b_level in zip(corral["levels"], baseline["levels"] if baseline else []):
        shared = set(c_level["replies"]) & set(b_level["replies"])
        mismatched += sum(c_level["replies"][p].strip() != b_level["replies"][p].strip() for p in shared)
        ratios[f"corral/serial tokens_per_s @{c_level['clients']}"] = round(
            c_level["tokens_per_s"] / b_level["tokens_per_s"], 2)
    if baseline:
        for c_row, b_row in zip(level_rows(corral), level_rows(baseline)):
            rows += [c_row, b_row]
    else:
        rows += level_rows(corral)
    rows += extra_rows
    ratios.update(extra_ratios)
    machine = machine_info()
    results = {
        "command": " ".join(["python bench/serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "versions": versions(("corral", "torch", "transformers", "fastapi", "uvicorn")),
        "setup": {"model": args.model, "max_new_tokens": args.max_tokens, "decoding": "greedy, repetition_penalty 1.1",
                  "clients": args.clients, "replies_differing_between_servers": mismatched,
                  "corral_serve_args": " ".join(args.serve_arg) or None,
                  "notes": "requests per level = max(min_requests, 2 x clients); tokens/s = output tokens / wall "
                           "time of the level; TTFT = request sent -> first streamed content. Static rows: no "
                           "server, in a fresh process, the same prompts (as token ids under the chat template) "
                           "in batches of 1 or 16, all of a batch started together, greedy with repetition "
                           "penalty 1.1, wall time over all batches after one untimed batch; llama.cpp's through "
                           "llama-cpp-python's C API, one llama_decode per step for every unfinished sequence "
                           "(its server would answer 16 clients one at a time)."},
        "rows": rows,
        "ratios": ratios,
        "json_schema_mask": mask_cost,
    }  # fmt: skip
    out = write_results(results_path("serve", machine["gpu"], args.out), results)
    print(json.dumps(ratios, indent=2))
    print(f"replies differing between the two servers: {mismatched}")
    print(f"wrote {out}")
    return 0


ROUNDS_NOTE = ("{n} rounds, each every row one after the other; a row's numbers are its medians over the rounds "
               "(runs_tokens_per_s: each round's), a ratio is the median of the rounds' own ratios. ")


def repeated(args, argv: list[str]) -> int:
    """`--repeat N`: N rounds of the whole run (each its own results file, then merged): each row's numbers are
    its medians over the rounds (every round's tokens/s kept in `runs_tokens_per_s`), and each ratio is the
    median of the rounds' own ratios, each computed from rows measured minutes apart rather than a run apart."""
    import tempfile

    base = _without(_without(argv, "--repeat"), "--out")
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(args.repeat):
            print(f"round {k + 1} of {args.repeat}", flush=True)
            out = Path(folder) / f"round{k}.json"
            main([*base, "--out", str(out)])
            rounds.append(json.loads(out.read_text()))
    merged = dict(rounds[0])
    merged["command"] = " ".join(["python bench/serve.py", *argv])
    merged["rows"] = []
    for row in rounds[0]["rows"]:
        same = [next(r for r in rnd["rows"] if r["name"] == row["name"]) for rnd in rounds]
        median = {k: statistics.median(r[k] for r in same) if isinstance(v, (int, float)) and v is not None
                  and not isinstance(v, bool) and all(isinstance(r.get(k), (int, float)) for r in same) else v
                  for k, v in row.items()}
        merged["rows"].append(median | {"runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in same]})
    merged["ratios"] = {k: round(statistics.median(rnd["ratios"][k] for rnd in rounds), 2)
                        for k, v in rounds[0]["ratios"].items() if isinstance(v, (int, float))}
    merged["setup"] = rounds[0]["setup"] | {"rounds": args.repeat, "replies_differing_between_servers": [
        rnd["setup"]["replies_differing_between_servers"] for rnd in rounds]}
    merged["setup"]["notes"] = ROUNDS_NOTE.format(n=args.repeat) + merged["setup"]["notes"]
    out = write_results(results_path("serve", merged["machine"]["gpu"], args.out), merged)
    print(json.dumps(merged["ratios"], indent=2))
    print(f"wrote {out}")
    return 0


def _without(argv: list[str], flag: str) -> list[str]:
    """argv less `flag VALUE` and `flag=VALUE`."""
    return [a for i, a in enumerate(argv) if a != flag and not a.startswith(flag + "=")
            and not (i and argv[i - 1] == flag)]


if __name__ == "__main__":
    sys.exit(main())
