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
        asyncio.run(run_level(url, model, 1, pool[:1], args.max_tokens, extra))  # warm-up, not recorded
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
    if args.baseline_server:
        baseline_server(args.model, args.port)
        return 0
    pool = prompts()
    print(f"serving benchmark on {args.model}: clients {args.clients}, max {args.max_tokens} new tokens, greedy")
    corral_port, base_port = free_port(), free_port()
    serve = [sys.executable, "-m", "corral.cli", "serve", "--model", f"m={args.model}", "--port"]
    corral = measure("corral serve", serve + [str(corral_port)], corral_port, "m", args, pool)
    extra_rows, extra_ratios, mask_cost = [], {}, None
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
        constrained = measure("corral serve json_schema", serve + [str(port)], port, "m", args, pool, extra)
        extra_rows += level_rows(constrained)
        for free, schema_level in zip(corral["levels"], constrained["levels"]):
            extra_ratios[f"json_schema/free tokens_per_s @{free['clients']}"] = round(
                schema_level["tokens_per_s"] / free["tokens_per_s"], 2)
        invalid = sum(not valid_reply(text) for level in constrained["levels"] for text in level["replies"].values())
        extra_ratios["json_schema replies failing the schema"] = invalid
        mask_cost = mask_cost_per_token(args.model)
    baseline = measure("transformers serial", [sys.executable, __file__, "--baseline-server", "--model", args.model,
                                               "--port", str(base_port)], base_port, "m", args, pool)

    rows, ratios, mismatched = [], {}, 0
    for c_level, b_level in zip(corral["levels"], baseline["levels"]):
        shared = set(c_level["replies"]) & set(b_level["replies"])
        mismatched += sum(c_level["replies"][p].strip() != b_level["replies"][p].strip() for p in shared)
        ratios[f"corral/serial tokens_per_s @{c_level['clients']}"] = round(
            c_level["tokens_per_s"] / b_level["tokens_per_s"], 2)
    for c_row, b_row in zip(level_rows(corral), level_rows(baseline)):
        rows += [c_row, b_row]
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
                  "notes": "requests per level = max(min_requests, 2 x clients); tokens/s = output tokens / wall "
                           "time of the level; TTFT = request sent -> first streamed content"},
        "rows": rows,
        "ratios": ratios,
        "json_schema_mask": mask_cost,
    }  # fmt: skip
    out = write_results(results_path("serve", machine["gpu"], args.out), results)
    print(json.dumps(ratios, indent=2))
    print(f"replies differing between the two servers: {mismatched}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
