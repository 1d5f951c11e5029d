"""Benchmark: `corral data clean` on a generated raw ShareGPT-style file, step by step, against FastChat's
`clean_sharegpt` (and `clean_sharegpt` + `split_long_conversation`) on the same records.

    python bench/data.py                      # 8,000 records: bench/results/data.json
    python bench/data.py --records 100000     # bench/results/data-100000.json

The raw file is made here from a seed (no data set is downloaded): replies as the HTML the ChatGPT page
showed (paragraphs, lists, headings, code blocks with their "Copy code" header, "1 / 1" regeneration
counters), and the faults of real dumps: exact and near-duplicates, conversations re-shared under a new
id, long chats (40-80 turns), a leading reply, consecutive user turns, a trailing user turn, error
replies, unknown roles, mojibake, a few French and Spanish chats. Rows, each in its own fresh child
process, one after the other (peak RSS from os.wait4); N is the number of CPU cores:

  corral data clean            every default step, language.keep=[en,unknown], split at 2048 tokens
                               (SmolLM2's tokenizer, chatml), one process (workers=1)
  corral data clean, N workers the same with workers=N (the default: one per core)
  corral html step only        only the HTML step and the role repair it cannot do without, one process
  corral html step only, N workers
  fastchat clean_sharegpt      fastchat.data.clean_sharegpt.main (fschat installed with --no-deps): HTML to
                               Markdown on every message, role and length checks, its two blocked words,
                               exact duplicates by id and first exchange; a process pool over all cores
  fastchat clean + split       the same, then fastchat.data.split_long_conversation's split_all at 2048
                               tokens (SmolLM2's tokenizer; a process pool) and its role filter, as its main()
                               does: what FastChat needs for the output `corral data clean` writes

Each row's time is the whole command: reading, every step, writing, and loading the tokenizer where it
needs one. With --repeat N the rows run N times, in rounds, and each row reports its median run (and
every run's rate): on a shared machine, load from elsewhere then falls on every row alike. Per-step rows
give conversations per second of each step of the first row, from its report (time in that step alone).
Writes bench/results/data.json (data-RECORDS.json for another --records) atomically; `--out` elsewhere.
The results record the CPU model and its flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's corral, installed or not

from bench.common import machine_info, results_path, run_row_child, versions, write_child_row, write_results  # noqa: E402

MODEL = "smollm2-135m"
TEMPLATE = "chatml"
SPLIT_MAX_LEN = 2048
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
ROWS = {
    "corral": "corral data clean",
    "corral-workers": f"corral data clean, {CORES} workers",
    "corral-fastchat-steps": "corral data clean, FastChat's steps",
    "corral-fastchat-steps-workers": f"corral data clean, FastChat's steps, {CORES} workers",
    "corral-html": "corral html step only",
    "corral-html-workers": f"corral html step only, {CORES} workers",
    "fastchat": "fastchat clean_sharegpt",
    "fastchat-split": "fastchat clean + split",
}
DEFAULT_RECORDS = 8000
WORDS = ("the a of to and in is it you that for on with as this be are can not or your have will an by at from "
         "use function data value file model system time first new example code list number string error return "
         "python class method user server request result table query test change version memory thread loop "
         "network process image text word line page order people way make like know take see get give think "
         "work call try need find tell ask show feel leave put mean keep let begin seem help talk turn start "
         "might move live believe bring happen write provide sit stand lose pay meet include continue set learn "
         "lead understand watch follow stop create speak read spend grow open walk win offer remember love "
         "consider appear buy wait serve die send expect build stay fall cut reach kill remain").split()  # fmt: skip
FRENCH = ("le la les un une des et est dans pour que qui pas sur avec il elle nous vous ils sont être avoir fait "
          "comme plus mais tout bien très aussi faire peut dire votre notre cette").split()  # fmt: skip
SPANISH = ("el la los las un una y es en para que no con por se su sus como más pero muy también hacer puede "
           "decir nuestro esta este tiene").split()  # fmt: skip
LANGUAGES = ("python", "javascript", "bash", "sql", "java", "")


def row_keys(text: str) -> list[str]:
    keys = [k for k in text.split(",") if k]
    if set(keys) - set(ROWS):
        raise argparse.ArgumentTypeError(f"unknown rows {sorted(set(keys) - set(ROWS))}; known: {', '.join(ROWS)}")
    return keys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", "--conversations", dest="records", type=int, default=DEFAULT_RECORDS,
                   help=f"raw records to generate (default {DEFAULT_RECORDS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="run every row this many times, in rounds, and report "
                   "each row's median run (default 1)")
    p.add_argument("--rows", default=",".join(ROWS), type=row_keys, help="rows to run (default all)")
    p.add_argument("--out", default=None)
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-raw", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The raw file


def sentence(rng: random.Random, vocabulary=WORDS, low: int = 6, high: int = 18) -> str:
    words = [rng.choice(vocabulary) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + rng.choice(".?!.")


def code_block(rng: random.Random) -> str:
    language = rng.choice(LANGUAGES)
    lines = [f"{rng.choice(('result', 'value', 'data', 'item'))}_{i} = compute({rng.randint(0, 99)}, "
             f"'{rng.choice(WORDS)}')" for i in range(rng.randint(2, 12))]  # fmt: skip
    code = "\n".join(f'<span class="hljs-keyword">{line[:6]}</span>{line[6:]}' for line in lines)
    return (f'<pre><div class="bg-black rounded-md mb-4"><div class="flex items-center relative text-gray-200 '
            f'bg-gray-800 px-4 py-2 text-xs font-sans"><span>{language or "code"}</span><button class="flex ml-auto '
            f'gap-2"><svg stroke="currentColor"></svg>Copy code</button></div><div class="p-4 overflow-y-auto">'
            f'<code class="!whitespace-pre hljs{f" language-{language}" if language else ""}">{code}\n</code>'
            "</div></div></pre>")  # fmt: skip


def html_reply(rng: random.Random, vocabulary=WORDS) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.45:
            parts.append(f"<p>{' '.join(sentence(rng, vocabulary) for _ in range(rng.randint(1, 4)))}</p>")
        elif kind < 0.65:
            tag = rng.choice(("ol", "ul"))
            items = "".join(f"<li>{sentence(rng, vocabulary, 3, 10)}</li>" for _ in range(rng.randint(2, 6)))
            parts.append(f"<{tag}>{items}</{tag}>")
        elif kind < 0.75:
            level = rng.randint(2, 3)
            parts.append(f"<h{level}>{sentence(rng, vocabulary, 2, 5)}</h{level}>")
        else:
            parts.append(code_block(rng))
    counter = "1 / 1" if rng.random() < 0.3 else ""
    return f'<div class="markdown prose w-full break-words dark:prose-invert light">{counter}{"".join(parts)}</div>'


def make_raw(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records: list[dict] = []
    while len(records) < n:
        i = len(records)
        roll = rng.random()
        if records and roll < 0.03:  # the same record twice
            records.append(json.loads(json.dumps(rng.choice(records))))
            continue
        if records and roll < 0.06:  # re-shared under a new id
            records.append({**json.loads(json.dumps(rng.choice(records))), "id": f"reshare{i}"})
            continue
        if records and roll < 0.09:  # a near-duplicate: one word of one reply changed
            copy = json.loads(json.dumps(rng.choice(records)))
            turn = copy["conversations"][-1]
            turn["value"] = turn["value"].replace(" the ", " a ", 1)
            records.append({**copy, "id": f"near{i}"})
            continue
        vocabulary = FRENCH if roll < 0.12 else SPANISH if roll < 0.14 else WORDS
        exchanges = rng.randint(20, 40) if rng.random() < 0.05 else rng.choice((1, 1, 1, 2, 2, 3, 4, 6))
        turns = []
        for _ in range(exchanges):
            turns.append({"from": "human", "value": sentence(rng, vocabulary, 4, 30)})
            turns.append({"from": "gpt", "value": html_reply(rng, vocabulary)})
        fault = rng.random()
        if fault < 0.03:
            turns.insert(0, {"from": "gpt", "value": "<p>Hello! How can I help you today?</p>"})
        elif fault < 0.06:
            turns.insert(0, {"from": "human", "value": sentence(rng, vocabulary)})
        elif fault < 0.08:
            turns.append({"from": "human", "value": sentence(rng, vocabulary)})
        elif fault < 0.10:
            turns[-1]["value"] = "<p>Too many requests in 1 hour. Try again later.</p>"
        elif fault < 0.11:
            turns[-1]["from"] = "robot"
        elif fault < 0.13:
            turns[0]["value"] = turns[0]["value"].replace("the", "thâ€™e")  # mojibake
        records.append({"id": f"conv{i}", "conversations": turns})
    return records


# ---------------------------------------------------------------------------------------------------------
# Rows


def run_corral(raw: Path, workdir: Path, extra: list[str]) -> dict:
    from corral.cli import main as corral_main

    out = workdir / "clean.jsonl"
    started = time.perf_counter()
    status = corral_main(["data", "clean", str(raw), "--output", str(out), *extra])
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"corral data clean exited {status}")
    report = json.loads((workdir / "clean.report.json").read_text())
    return {"conversations_per_s": report["records"] / wall, "wall_s": wall, "records": report["records"],
            "kept": report["kept"], "written": report["written"], "rejected": report["rejected"],
            "steps": {name: {"seen": s["seen"], "seconds": s["seconds"]} for name, s in report["steps"].items()
                      if s["enabled"] and s["seen"]}}  # fmt: skip


def run_fastchat(raw_json: Path, workdir: Path, split: bool = False) -> dict:
    import fastchat.data.clean_sharegpt as fastchat_clean

    out = workdir / "fastchat.json"
    records = int(json.loads(raw_json.with_suffix(".stats").read_text())["records"])  # not by loading 0.5 GB here
    started = time.perf_counter()
    fastchat_clean.main({"in_file": str(raw_json), "out_file": str(out), "begin": None, "end": None})
    if split:  # split_long_conversation's main(), with the tokenizer corral's rows use
        import fastchat.data.split_long_conversation as fastchat_split
        import transformers

        from corral.models.load import resolve_model

        content = json.load(open(out))
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            resolve_model(MODEL).path, model_max_length=SPLIT_MAX_LEN, padding_side="right", use_fast=False)
        pieces = fastchat_split.split_all(content, None, None, tokenizer, SPLIT_MAX_LEN)
        pieces = fastchat_split.filter_invalid_roles(pieces)
        out = workdir / "fastchat_split.json"
        json.dump(pieces, open(out, "w"), indent=2, ensure_ascii=False)
    wall = time.perf_counter() - started
    row = {"conversations_per_s": records / wall, "wall_s": wall, "records": records}
    with open(out) as f:  # json.dump(indent=2) starts each record of the list on a line of its own with "  {"
        written = sum(line.startswith("  {") for line in f)
    return row | ({"written": written} if split else {"kept": written, "rejected": records - written})


CORRAL_ARGS = {
    "corral": ["language.keep=[en,unknown]", f"split_max_len={SPLIT_MAX_LEN}", f"model={MODEL}",
               f"template={TEMPLATE}", "workers=1"],
    "corral-html": ["text.unicode=false", "text.whitespace=false", "filters.error_replies=[]",
                    "filters.min_reply_chars=0", "filters.wrong_list_numbering=false", "dedup.by_id=false",
                    "dedup.by_first_exchange=false", "dedup.near.enabled=false", "workers=1"],
}  # fmt: skip
# The work FastChat's clean_sharegpt + split_long_conversation do (HTML, roles, length checks, exact duplicates,
# the split), plus the cheap text steps: no language detection, no near-duplicate search.
CORRAL_ARGS["corral-fastchat-steps"] = [a for a in CORRAL_ARGS["corral"] if not a.startswith("language.")][:-1] + [
    "dedup.near.enabled=false", "workers=1"]
CORRAL_ARGS["corral-workers"] = CORRAL_ARGS["corral"][:-1] + [f"workers={CORES}"]
CORRAL_ARGS["corral-fastchat-steps-workers"] = CORRAL_ARGS["corral-fastchat-steps"][:-1] + [f"workers={CORES}"]
CORRAL_ARGS["corral-html-workers"] = CORRAL_ARGS["corral-html"][:-1] + [f"workers={CORES}"]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def child_main(args) -> None:
    raw = Path(args.raw)
    with tempfile.TemporaryDirectory(prefix=f"bench-data-{args.child}-") as workdir:
        if args.child in ("fastchat", "fastchat-split"):
            row = run_fastchat(raw.with_suffix(".json"), Path(workdir), split=args.child == "fastchat-split")
        else:
            row = run_corral(raw, Path(workdir), CORRAL_ARGS[args.child])
    write_child_row(row, args.child_result)


def write_raw(raw: Path, records: int, seed: int) -> None:
    """RAW (JSONL, corral's input), RAW with .json (the same records in a JSON list, FastChat's) and RAW with
    .stats (turns and size)."""
    made = make_raw(records, seed)
    with open(raw, "w") as f:
        for record in made:
            f.write(json.dumps(record) + "\n")
    with open(raw.with_suffix(".json"), "w") as f:
        json.dump(made, f)
    stats = {"records": len(made), "turns": sum(len(r["conversations"]) for r in made),
             "raw_mb": raw.stat().st_size / 2**20}
    raw.with_suffix(".stats").write_text(json.dumps(stats))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.make_raw:
        write_raw(Path(args.make_raw), args.records, args.seed)
        return 0
    runs: dict[str, list[dict]] = {key: [] for key in args.rows}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as workdir:
        raw = Path(workdir) / "raw.jsonl"
        # Made in a child: a row's child starts as a fork of this process, and its peak RSS would count this
        # process's memory if the records had ever been held here.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-raw", str(raw), "--records",
                        str(args.records), "--seed", str(args.seed)], check=True)  # fmt: skip
        made = json.loads(raw.with_suffix(".stats").read_text())
        size_mb, turns = made["raw_mb"], made["turns"]
        print(f"raw file: {args.records} conversations, {turns} turns, {size_mb:.1f} MB", flush=True)
        for round_ in range(args.repeat):  # rounds, not row after row: load from elsewhere hits every row alike
            for key in args.rows:
                print(f"running {ROWS[key]} ({round_ + 1}/{args.repeat}) ...", flush=True)
                row = run_row_child(Path(__file__), key, ROWS[key], [*argv, "--raw", str(raw)], Path(workdir))
                print(f"  {row['conversations_per_s']:.0f} conversations/s, {row['wall_s']:.1f} s, "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
                runs[key].append(row)
    rows, steps = {}, {}
    for key, key_runs in runs.items():
        row = sorted(key_runs, key=lambda r: r["conversations_per_s"])[(len(key_runs) - 1) // 2]  # the median run
        if key == "corral":
            steps = row.pop("steps")
        row.pop("steps", None)
        if len(key_runs) > 1:
            row["runs_conversations_per_s"] = [round(r["conversations_per_s"], 1) for r in key_runs]
        rows[ROWS[key]] = row
    step_rows = [{"name": f"corral step: {name}", "conversations_per_s": s["seen"] / s["seconds"],
                  "step_s": s["seconds"], "records": s["seen"]} for name, s in steps.items() if s["seconds"] > 0]
    ratios = {}
    for corral_key, fastchat_key in (("corral-fastchat-steps-workers", "fastchat-split"),
                                     ("corral-fastchat-steps", "fastchat-split"),
                                     ("corral-workers", "fastchat-split"), ("corral", "fastchat-split"),
                                     ("corral-workers", "fastchat"), ("corral", "fastchat"),
                                     ("corral-html-workers", "fastchat"), ("corral-html", "fastchat")):
        if ROWS[corral_key] in rows and ROWS[fastchat_key] in rows:
            ratios[f"{ROWS[corral_key]} / {ROWS[fastchat_key]} conversations_per_s"] = round(
                rows[ROWS[corral_key]]["conversations_per_s"] / rows[ROWS[fastchat_key]]["conversations_per_s"], 3)
    machine = machine_info() | {"cpu_flags": cpu_flags()}
    results = {
        "command": " ".join(["python bench/data.py", *map(shlex.quote, argv)]),
        "date": datetime.date.today().isoformat(), "machine": machine,
        "versions": versions(("corral", "fschat", "markdownify", "beautifulsoup4", "ftfy", "datasketch", "py3langid",
                              "transformers")),
        "setup": {"conversations": args.records, "turns": turns, "raw_mb": round(size_mb, 1), "seed": args.seed,
                  "notes": "a generated raw ShareGPT-style file (ChatGPT-page HTML replies, 3% repeated records, 3% "
                           "re-shared under a new id, 3% near-duplicates, 5% chats of 40-80 turns, role faults, error "
                           "replies, mojibake, 4% French or Spanish); corral reads it as JSONL, FastChat as the same "
                           "records in a JSON list. The corral rows run every step they name (the full rows also "
                           "language detection and near-duplicates, which FastChat's two scripts do not do); "
                           "FastChat's clean_sharegpt does HTML to Markdown on every message, its role and length "
                           "checks, two blocked words and exact duplicates, in a process pool over all cores, and "
                           "writes indented JSON; its split_long_conversation then tokenizes every message (it asks "
                           "for the slow tokenizer; transformers 5 gives the fast one) in a process pool. Split: "
                           f"{MODEL}'s tokenizer, {TEMPLATE}, {SPLIT_MAX_LEN} tokens. Per-step rows: time inside each "
                           "step of the first row (its median run), from its report. Each row in its own process, one "
                           "at a time; with --repeat, in rounds, each row's median run."},
        "rows": list(rows.values()) + step_rows,
        "ratios": ratios,
    }  # fmt: skip
    area = "data" if args.records == DEFAULT_RECORDS else f"data-{args.records}"
    out = write_results(results_path(area, machine["gpu"], args.out), results)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
