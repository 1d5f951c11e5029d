"""`corral distill`: Lion's adversarial distillation. One teacher behind any OpenAI-compatible endpoint plays
three roles (teacher, referee, generator) for a student Corral trains, iteration after iteration:

1. Imitation: the teacher answers the train pool (each instruction once in the whole run); the student is
   fine-tuned on those answers with the SFT recipe, starting from its previous iteration's weights (a LoRA
   adapter is merged into them: iter-NN/student).
2. Discrimination: teacher and student (through the batched engine) answer the cache pool; the referee scores
   both answers in one prompt, in both orders, averaged per side; hard = teacher - student >= threshold.
3. Generation: new instructions from sampled hard ones (same domain and task type) and easy ones (same domain,
   rarer), filtered and de-duplicated by ROUGE-L against the cache pool and each other.
4. Pools: the next train pool is the new instructions; the cache pool grows with them.

Everything a stage produces is on disk before the next starts (OUTPUT/iter-NN/...), calls are appended as they
arrive, and a finished stage is not redone, so a killed run continues where it was. A budget on endpoint calls
and tokens stops the run cleanly; a re-run with a larger one continues.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from corral.atomic import atomic_write_text, read_jsonl
from corral.config import DistillConfig, SFTConfig, dump_config, load_config, save_config
from corral.distill.calls import Budget, JobsResult, make_role, tokens_of
from corral.distill.pools import (Instruction, next_pools, read_pool, read_seed_pool, sample, write_pool)
from corral.distill.prompts import DistillPrompts, load_prompts, teacher_messages
from corral.distill.report import write_report
from corral.distill.stages import (answer_with_student, answer_with_teacher, discriminate, generate_candidates,
                                   generation_requests, job_finished, referee_attempts, referee_jobs,
                                   score_with_referee, select_new, student_answers, teacher_answers)
from corral.generate.sampling import SamplingParams

TEACHER_ANSWERS = "teacher_answers.jsonl"
# Settings a re-run may change: how far and how fast to go, not what is computed.
RESUMABLE_CHANGES = ("iterations", "max_teacher_calls", "max_teacher_tokens", "concurrency", "retries", "timeout",
                     "api_key_env", "api", "resume", "report_to", "max_batch", "save_every", "log_every")


class BudgetReached(Exception):
    """No call may start: the run stops cleanly, with what it has on disk."""


def iteration_dir(out: Path, k: int) -> Path:
    return out / f"iter-{k:02d}"


def log(message: str) -> None:
    print(f"corral distill: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# What has been spent: the usage recorded with every call, summed over the run folder


def call_files(out: Path) -> dict[str, list[Path]]:
    return {"teacher": [out / TEACHER_ANSWERS], "referee": sorted(out.glob("iter-*/referee.jsonl")),
            "generator": sorted(out.glob("iter-*/candidates.jsonl"))}  # fmt: skip


def spent(out: Path, iteration: int | None = None) -> dict:
    """Calls and tokens by role (all iterations, or one), from the records: a kill loses nothing counted."""
    roles = {}
    for role, paths in call_files(out).items():
        records = [r for p in paths for r in read_jsonl(p) if iteration is None or r.get("iteration") == iteration]
        roles[role] = {"calls": len(records), "tokens": sum(tokens_of(r.get("usage")) for r in records)}
    return {"calls": sum(r["calls"] for r in roles.values()), "tokens": sum(r["tokens"] for r in roles.values()),
            "roles": roles}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Resuming


def check_resume(cfg: DistillConfig, out: Path) -> None:
    """Refuse a re-run whose settings would change what the finished stages computed."""
    from corral.recipes.pipeline import changed_settings

    saved = out / "config.yaml"
    if not saved.is_file():
        return
    old = load_config(DistillConfig, saved).model_dump(mode="json")
    changed = [c for c in changed_settings(old, cfg.model_dump(mode="json"))
               if c.split(":")[0].split(".")[-1] not in RESUMABLE_CHANGES]  # fmt: skip
    if changed:
        raise ValueError(f"{out} was started with other settings ({'; '.join(changed)}); restore them to continue, "
                         "or use another output_dir")


def check_stage(result: JobsResult, budget: Budget, where: str) -> None:
    if result.errors:
        sys.exit(f"corral distill: {where}: {len(result.errors)} calls failed after retries (first: {result.errors[0]}); "
                 "what was answered is kept: run the same command again to ask only the rest")
    if result.stopped:
        raise BudgetReached(f"{budget.exhausted()} during {where}")


# ---------------------------------------------------------------------------------------------
# The stages as this run composes them


def pools_for(cfg: DistillConfig, out: Path, k: int) -> tuple[list[Instruction], list[Instruction]]:
    """The iteration's train and cache pools: from the seeds (iteration 1) or the previous iteration's generated
    instructions, written once and read back afterwards."""
    it = iteration_dir(out, k)
    train_path, cache_path = it / "train_pool.jsonl", it / "cache_pool.jsonl"
    if train_path.is_file() and cache_path.is_file():
        return read_pool(train_path), read_pool(cache_path)
    if k == 1:
        seeds, report = read_seed_pool(cfg.data.path, cfg.data.format, cfg.data.skip_invalid)
        log(f"seed pool: {report.summary()}")
        train = sample(seeds, cfg.data.train_size, f"{cfg.data.seed}:train")
        cache = list(train)
    else:
        previous = iteration_dir(out, k - 1)
        new = [Instruction(**i) for i in json.loads((previous / "generated.json").read_text())["kept"]]
        train, cache = next_pools(read_pool(previous / "cache_pool.jsonl"), new, cfg.data.cache_max)
    write_pool(cache_path, cache)  # the cache pool first: the train pool's file marks both written
    write_pool(train_path, train)
    return train, cache


def imitate(cfg: DistillConfig, it: Path, train_pool: list[Instruction], answers: dict[str, dict], start: str,
            started: float) -> dict:
    """Fine-tune the student on the teacher's answers to the train pool with the SFT recipe, from `start`; a LoRA
    adapter is merged into `start`'s weights, so the next iteration continues from them. `started`: when the
    stage (the teacher's answers first) began in this run."""
    from corral.recipes import sft

    marker = it / "imitation.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    examples = [(i, answers[i.id]["answer"]) for i in train_pool if i.id in answers and answers[i.id]["answer"]]
    empty = sum(1 for i in train_pool if i.id in answers and not answers[i.id]["answer"])
    record = {"start": start, "examples": len(examples), "empty_answers_left_out": empty}
    if not examples:
        record |= {"student": start, "skipped": "no teacher answers to train on", "steps": 0, "loss": None}
    else:
        data = it / "imitation_data.jsonl"
        atomic_write_text(data, "".join(json.dumps({"messages": teacher_messages(i.prompt, cfg.teacher.system)
                                                    + [{"role": "assistant", "content": answer}]}, ensure_ascii=False)
                                        + "\n" for i, answer in examples))  # fmt: skip
        sft_cfg = SFTConfig.model_validate({
            "model": start, "template": cfg.template, "method": cfg.method, "dtype": cfg.dtype,
            "output_dir": str(it / "imitation"), "data": {"path": str(data), "format": "openai"},
            "train": cfg.train.model_dump(), "lora": cfg.lora.model_dump(),
        })  # fmt: skip
        result = sft.run(sft_cfg)
        student = result.model_dir
        if cfg.method == "lora":
            from corral.models.adapters import merge_adapter

            student = merge_adapter(result.model_dir, it / "student", cfg.dtype)
        gc.collect()
        record |= {"student": str(student), **result.summary}
    record["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_text(marker, json.dumps(record, indent=2, default=str) + "\n")
    return record


def student_generator(cfg: DistillConfig, student: str):
    """`generate(prompts) -> replies` through the engine, on the student's weights and chat template."""
    from corral.chat.conversation import Conversation, Message
    from corral.chat.templates import get_template
    from corral.generate.chat import generate_replies
    from corral.generate.engine import TransformersEngine
    from corral.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(student)
    template = get_template(cfg.template, tokenizer)
    engine = TransformersEngine(load_model(student, dtype=cfg.dtype), tokenizer, max_batch=cfg.student.max_batch)
    params = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=cfg.student.temperature,
                            repetition_penalty=cfg.student.repetition_penalty, seed=cfg.data.seed)  # fmt: skip
    system = [Message("system", cfg.teacher.system)] if cfg.teacher.system else []

    def generate(prompts: list[str]) -> list[str]:
        return generate_replies(engine, template, [Conversation(system + [Message("user", p)]) for p in prompts], params)

    return generate


def discrimination_stage(cfg: DistillConfig, it: Path, k: int, cache_pool: list[Instruction], student: str,
                         roles: dict, prompts: DistillPrompts, budget: Budget, out: Path) -> dict:
    marker = it / "discrimination.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    started = time.perf_counter()
    scored = sample(cache_pool, cfg.data.discriminate_size, f"{cfg.data.seed}:discriminate:{k}")
    teacher = roles["teacher"]
    result, cached = answer_with_teacher(scored, teacher, teacher_params(cfg), cfg.teacher.system,
                                         out / TEACHER_ANSWERS, budget, k, "cache")  # fmt: skip
    log(f"iteration {k}: discrimination: teacher answered {result.done} of {len(scored)} cache-pool instructions "
        f"({cached} answered before)")
    check_stage(result, budget, f"iteration {k} discrimination (teacher answers)")
    answers = teacher_answers(out / TEACHER_ANSWERS, teacher.model, cfg.teacher.system, scored)

    student_path = it / "student_answers.jsonl"
    if len(student_answers(student_path).keys() & {i.id for i in scored}) < len({i.id for i in scored}):
        log(f"iteration {k}: discrimination: the student ({student}) answers through the engine")
        generate = student_generator(cfg, student)
        answered = answer_with_student(scored, generate, student_path, cfg.student.max_batch)
        del generate
        gc.collect()
        log(f"iteration {k}: discrimination: the student answered {answered}")
    mine = student_answers(student_path)

    referee = roles["referee"]
    jobs = referee_jobs(scored, answers, mine, prompts, referee.model, cfg.referee.constrained)
    max_attempts = 1 + cfg.referee.parse_retries
    result = score_with_referee(jobs, referee, referee_params(cfg), max_attempts, it / "referee.jsonl", budget, k)
    log(f"iteration {k}: discrimination: referee judged {result.done} of {len(jobs)} (instruction, order) pairs now")
    check_stage(result, budget, f"iteration {k} discrimination (referee)")
    attempts = referee_attempts(it / "referee.jsonl")
    unfinished = [job for job in jobs if not job_finished(attempts.get(job.key, []), max_attempts)]
    if unfinished:  # cannot happen after a complete stage: a guard against scoring half a stage
        raise RuntimeError(f"{len(unfinished)} referee jobs unfinished in {it / 'referee.jsonl'}")
    found = discriminate(jobs, attempts, answers, mine, cfg.threshold)
    found["seconds"] = round(time.perf_counter() - started, 2)
    found["referee_attempts"] = sum(len(attempts.get(job.key, [])) for job in jobs)
    atomic_write_text(marker, json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    return found


def generation_stage(cfg: DistillConfig, it: Path, k: int, found: dict, cache_pool: list[Instruction],
                     roles: dict, prompts: DistillPrompts, budget: Budget) -> dict:
    marker = it / "generated.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    started = time.perf_counter()
    by_id = {i.id: i for i in cache_pool}
    seeds = {label: [by_id[r["id"]] for r in found["rows"] if r["label"] == label] for label in ("hard", "easy")}
    targets = {"hard": cfg.generator.new_hard, "easy": cfg.generator.new_easy}
    path = it / "candidates.jsonl"
    generator = roles["generator"]
    params = SamplingParams(temperature=cfg.generator.temperature, top_p=cfg.generator.top_p, seed=cfg.generator.seed)

    def select(candidates: list[dict]):
        return select_new(candidates, cache_pool, cfg.generator.similarity, cfg.generator.min_distinct_trigrams, k)

    requests = 0
    for round_ in range(cfg.generator.max_rounds):
        # What this round asks for follows from the earlier rounds' records only: a re-run asks the same.
        before = select([c for c in read_jsonl(path) if c["round"] < round_])
        need = {kind: max(0, targets[kind] - before.kept_of(kind)) if seeds[kind] else 0 for kind in targets}
        if not any(need.values()):
            break
        batch = [r for kind in ("hard", "easy")
                 for r in generation_requests(kind, seeds[kind], need[kind], round_, cfg.generator.seed, k)]  # fmt: skip
        requests += len(batch)
        result = generate_candidates(batch, generator, prompts, params, cfg.generator.max_tokens, path, budget, k)
        check_stage(result, budget, f"iteration {k} generation (round {round_ + 1})")
    selection = select(read_jsonl(path))
    dropped: dict[str, int] = {}
    for d in selection.dropped:
        dropped[d["reason"]] = dropped.get(d["reason"], 0) + 1
    record = {
        "kept": [asdict(i) for i in selection.kept], "dropped": selection.dropped,
        "counts": {"requests": requests, "kept": len(selection.kept), "kept_hard": selection.kept_of("hard"),
                   "kept_easy": selection.kept_of("easy"), "dropped": dropped,
                   "targets": targets, "seed_instructions": {kind: len(v) for kind, v in seeds.items()}},
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    atomic_write_text(marker, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def teacher_params(cfg: DistillConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_tokens, temperature=cfg.teacher.temperature, top_p=cfg.teacher.top_p,
                          seed=cfg.teacher.seed)  # fmt: skip


def referee_params(cfg: DistillConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.referee.max_tokens, temperature=cfg.referee.temperature,
                          seed=cfg.referee.seed)  # fmt: skip


def make_roles(cfg: DistillConfig) -> dict:
    """The teacher's endpoint for all three roles, unless the referee's or generator's section names another."""
    t = cfg.teacher
    roles = {"teacher": make_role("teacher", t.api, t.model, t.api_key_env, t.retries, t.timeout, t.concurrency)}
    for name in ("referee", "generator"):
        s = getattr(cfg, name)
        roles[name] = make_role(name, s.api or t.api, s.model or t.model, s.api_key_env or t.api_key_env, s.retries,
                                s.timeout, s.concurrency)  # fmt: skip
    return roles


def summary_of(k: int, train_pool, cache_pool, imitation: dict, found: dict, generated: dict, out: Path) -> dict:
    cost = spent(out, k)
    counts = generated["counts"]
    return {
        "iteration": k, "train_pool": len(train_pool), "cache_pool": len(cache_pool),
        "discriminated": found["scored"] + found["unparseable"], "scored": found["scored"], "hard": found["hard"],
        "easy": found["easy"], "unparseable": found["unparseable"],
        "generated": {key: counts[key] for key in ("requests", "kept", "kept_hard", "kept_easy", "dropped")},
        "teacher_score": found["teacher_score"], "student_score": found["student_score"], "gap": found["gap"],
        "teacher_calls": cost["calls"], "teacher_tokens": cost["tokens"], "by_role": cost["roles"],
        "referee_attempts": found.get("referee_attempts"), "train_loss": imitation.get("loss"),
        "train_steps": imitation.get("steps"), "train_examples": imitation.get("examples"),
        "student": imitation["student"],
        "seconds_by_stage": {"imitation": imitation.get("seconds"), "discrimination": found.get("seconds"),
                             "generation": generated.get("seconds")},
        "seconds": round(sum(x or 0 for x in (imitation.get("seconds"), found.get("seconds"), generated.get("seconds"))), 2),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def run(cfg: DistillConfig) -> dict:
    out = Path(cfg.output_dir)
    check_resume(cfg, out)
    prompts = load_prompts(cfg.prompts or None)
    roles = make_roles(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    print(f"corral distill: resolved config\n{dump_config(cfg)}", flush=True)
    before = spent(out)
    budget = Budget(cfg.max_teacher_calls, cfg.max_teacher_tokens, before["calls"], before["tokens"])
    log(f"teacher {roles['teacher'].model} at {cfg.teacher.api}; referee {roles['referee'].model}, generator "
        f"{roles['generator'].model}; {before['calls']} calls ({before['tokens']} tokens) recorded in {out} so far")

    student, summaries, discriminations, stopped = cfg.model, [], {}, None
    for k in range(1, cfg.iterations + 1):
        it = iteration_dir(out, k)
        done = it / "iteration.json"
        if done.is_file():
            summary = json.loads(done.read_text())
            summaries.append(summary)
            discriminations[k] = json.loads((it / "discrimination.json").read_text())
            student = summary["student"]
            log(f"iteration {k}: done before ({done}): skipped")
            continue
        try:
            train_pool, cache_pool = pools_for(cfg, out, k)
            log(f"iteration {k}/{cfg.iterations}: train pool {len(train_pool)}, cache pool {len(cache_pool)}")
            # 1. Imitation
            started = time.perf_counter()
            result, cached = answer_with_teacher(train_pool, roles["teacher"], teacher_params(cfg), cfg.teacher.system,
                                                 out / TEACHER_ANSWERS, budget, k, "train")  # fmt: skip
            log(f"iteration {k}: imitation: teacher answered {result.done} of {len(train_pool)} ({cached} answered before)")
            check_stage(result, budget, f"iteration {k} imitation (teacher answers)")
            answers = teacher_answers(out / TEACHER_ANSWERS, roles["teacher"].model, cfg.teacher.system, train_pool)
            imitation = imitate(cfg, it, train_pool, answers, student, started)
            student = imitation["student"]
            log(f"iteration {k}: imitation: student {student}"
                + (f" ({imitation['skipped']})" if imitation.get("skipped") else f", loss {imitation.get('loss')}"))
            # 2. Discrimination
            found = discrimination_stage(cfg, it, k, cache_pool, student, roles, prompts, budget, out)
            discriminations[k] = found
            log(f"iteration {k}: discrimination: {found['hard']} hard, {found['easy']} easy, {found['unparseable']} "
                f"unparseable (excluded); mean referee score teacher {found['teacher_score']}, student "
                f"{found['student_score']}")
            # 3. Generation
            generated = generation_stage(cfg, it, k, found, cache_pool, roles, prompts, budget)
            c = generated["counts"]
            log(f"iteration {k}: generation: kept {c['kept']} ({c['kept_hard']} hard, {c['kept_easy']} easy) of "
                f"{c['requests']} requests; dropped {c['dropped'] or 'none'}")
        except BudgetReached as e:
            stopped = f"iteration {k}: {e}"
            log(f"stopped: {stopped}. Everything so far is on disk; raise the budget and run the same command again "
                "to continue.")
            break
        summary = summary_of(k, train_pool, cache_pool, imitation, found, generated, out)
        atomic_write_text(done, json.dumps(summary, indent=2, default=str) + "\n")
        summaries.append(summary)
        write_report(out, summaries, discriminations, spent(out), None)
    paths = write_report(out, summaries, discriminations, spent(out), stopped)
    if budget.no_usage:
        log(f"note: {budget.no_usage} replies came without `usage`: their tokens are not counted (nor by "
            "max_teacher_tokens)")
    log(f"report: {paths['html']} ({paths['json']}); student: {student}")
    return {"iterations": summaries, "student": student, "stopped": stopped, "report": paths, "spent": spent(out)}
