"""`corral distill` end to end: a real `corral serve` with the embedded SmolLM2 on 127.0.0.1 is teacher, referee
(constrained JSON verdicts) and generator; the tiny random model is the student. Two iterations, with the run
SIGKILLed in the middle of the teacher's answers, the fine-tune, the referee and the generation, and re-run
each time. The calls are counted at the server (its /metrics): every completed call is one record, none
is repeated after a resume but the ones in flight at a kill, and a finished run asks nothing more. This checks
the loop's bookkeeping, not what a 135M teacher can teach."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from corral.atomic import read_jsonl
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

SEEDS = ["Give two tips for sleeping well.", "Name three colors of the rainbow.",
         "Explain what a thermometer measures.", "Write one sentence about the sea."]  # fmt: skip
CONCURRENCY = 2


def served_completions(server: ServerProcess) -> int:
    """Chat completions the server answered (status 200), from its Prometheus counter."""
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    found = re.findall(r'^corral:http_requests_total\{(.*?)\} ([0-9.e+]+)$', text, flags=re.MULTILINE)
    return int(sum(float(v) for labels, v in found
                   if 'path="/v1/chat/completions"' in labels and 'status="200"' in labels and 'method="POST"' in labels))


def records(out: Path) -> dict[str, list[dict]]:
    return {"teacher": read_jsonl(out / "teacher_answers.jsonl"),
            "referee": [r for p in sorted(out.glob("iter-*/referee.jsonl")) for r in read_jsonl(p)],
            "generator": [r for p in sorted(out.glob("iter-*/candidates.jsonl")) for r in read_jsonl(p)]}  # fmt: skip


def record_keys(out: Path) -> list[str]:
    found = records(out)
    # a referee prompt can recur in another iteration (a student that did not change answers the same): keyed per iteration
    return ([r["key"] for r in found["teacher"]] + [f"{r['iteration']}:{r['key']}#{r['attempt']}" for r in found["referee"]]
            + [f"{r['iteration']}:{r['request']}" for r in found["generator"]])  # fmt: skip


def kill_when(command: list[str], ready, what: str, timeout: float = 300) -> None:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting to kill {what}")


def test_two_iterations_against_corral_serve_resume_after_sigkill_in_every_stage(tmp_path, tiny_model_dir):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s, "input": ""}) + "\n" for s in SEEDS))
    out = tmp_path / "distill"
    it1, it2 = out / "iter-01", out / "iter-02"
    server = ServerProcess([], timeout=300)  # the embedded SmolLM2: teacher, referee and generator
    try:
        command = [sys.executable, "-m", "corral.cli", "distill", f"model={tiny_model_dir}", f"output_dir={out}",
                   "iterations=2", f"data.path={seeds}", f"teacher.api={server.url}/v1", "teacher.model=smollm2-135m",
                   "max_tokens=16", "referee.constrained=true", "referee.max_tokens=96", "referee.parse_retries=1",
                   "generator.new_hard=2", "generator.new_easy=2", "generator.max_rounds=2", "generator.max_tokens=48",
                   "generator.temperature=0.7", "train.max_steps=4", "train.save_every=1", "train.batch_size=2",
                   "train.max_len=256", "lora.r=4", "lora.alpha=8", "student.max_batch=4"]
        command += [f"{role}.concurrency={CONCURRENCY}" for role in ("teacher", "referee", "generator")]
        served_before = served_completions(server)
        lines = lambda path, n: lambda: len(read_jsonl(path)) >= n
        kills = [
            ("in the teacher's answers", lines(out / "teacher_answers.jsonl", 2)),
            ("in the fine-tune", lambda: (it1 / "imitation" / "checkpoints" / "step-000001").is_dir()),
            ("in the referee's judgments", lines(it1 / "referee.jsonl", 3)),
            ("in the generation", lines(it1 / "candidates.jsonl", 1)),
        ]
        kept_at_kill = []
        for what, ready in kills:
            kill_when(command, ready, what)
            kept_at_kill.append(set(record_keys(out)))
        assert not (it1 / "iteration.json").exists()
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
        served = served_completions(server) - served_before

        keys = record_keys(out)
        assert len(keys) == len(set(keys))  # no call recorded twice
        for before in kept_at_kill:
            assert before <= set(keys)  # nothing recorded before a kill was lost
        # every recorded call was answered by the server once; the only calls the server answered beyond the
        # records are those in flight at a kill (at most `concurrency` each), asked again after it
        assert len(keys) <= served <= len(keys) + CONCURRENCY * len(kills)

        # the fine-tune resumed from its checkpoint instead of starting over
        imitation = json.loads((it1 / "imitation.json").read_text())
        assert imitation["resumed_from"] >= 1 and imitation["steps"] == 4
        # pools as Lion's: the next train pool is the new instructions, the cache pool grew by them
        generated = json.loads((it1 / "generated.json").read_text())
        pool = lambda path: [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert pool(it2 / "train_pool.jsonl") == [i["id"] for i in generated["kept"]]
        assert pool(it2 / "cache_pool.jsonl") == pool(it1 / "cache_pool.jsonl") + pool(it2 / "train_pool.jsonl")
        teacher_prompts = [r["messages"][-1]["content"] for r in records(out)["teacher"]]
        assert sorted(teacher_prompts) == sorted(SEEDS + [i["prompt"] for i in generated["kept"]])

        report = json.loads((out / "report.json").read_text())
        assert [s["iteration"] for s in report["iterations"]] == [1, 2] and report["stopped"] is None
        assert report["spent"]["calls"] == len(keys)
        for summary, it in zip(report["iterations"], (it1, it2)):
            found = json.loads((it / "discrimination.json").read_text())
            assert summary["hard"] + summary["easy"] + summary["unparseable"] == summary["cache_pool"]
            assert (summary["hard"], summary["easy"]) == (found["hard"], found["easy"])
            judged = read_jsonl(it / "referee.jsonl")
            assert all(r["constrained"] and (r["parsed"] == (r["scores"] is not None)) for r in judged)
            assert summary["teacher_tokens"] > 0  # corral serve reports usage
        assert (out / "report.html").read_text().startswith("<!doctype html>")
        print(done.stdout[-3000:])
        print(f"served {served} chat completions for {len(keys)} records; report: {json.dumps(report['iterations'])[:1500]}")

        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-4000:]
        assert served_completions(server) - served_before == served  # finished: nothing asked again
        assert "iteration 2: done before" in again.stdout
    finally:
        server.stop()
