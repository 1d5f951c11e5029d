"""`corral judge answer | grade | report`: LLM-as-judge evaluation of one or more models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from corral.config import EMBEDDED_MODEL, JudgeAnswerConfig, JudgeGradeConfig, JudgeReportConfig
from corral.eval.question_set import describe_sample, read_questions, stratified_sample
from corral.generate.sampling import SamplingParams


def _client(url: str, model: str, key_env: str, retries: int, timeout: float):
    from openai import OpenAI

    if not model:
        raise ValueError(f"an endpoint ({url}) needs its model name (api_model / judge_model)")
    return OpenAI(base_url=url, api_key=os.environ.get(key_env) or "none", max_retries=retries, timeout=timeout)


def api_backend(url: str, model: str, key_env: str, retries: int, timeout: float, send_extensions: bool = False):
    """A model to answer questions, behind an OpenAI-compatible endpoint."""
    from corral.serve.backends import APIBackend

    return APIBackend(_client(url, model, key_env, retries, timeout), model, send_extensions=send_extensions)


def judge_client(url: str, model: str, key_env: str, retries: int, timeout: float):
    """The judge behind an OpenAI-compatible endpoint (logprobs and response_format when asked)."""
    from corral.eval.client import OpenAIJudge

    return OpenAIJudge(_client(url, model, key_env, retries, timeout), model)


def load_questions(path: str, limit: int, seed: int) -> tuple[list, str]:
    """The questions to use (a stratified sample when `limit` is set) and a line saying which."""
    every = read_questions(path)
    questions = stratified_sample(every, limit, seed)
    return questions, f"{describe_sample(questions, len(every), seed)} from {path}"


def answer(cfg: JudgeAnswerConfig) -> dict:
    from corral.eval.answer import generate_answers

    questions, picked = load_questions(cfg.questions, cfg.limit, cfg.limit_seed)
    answers_dir = Path(cfg.output_dir) / "answers"
    params = SamplingParams(max_new_tokens=cfg.max_tokens, top_p=cfg.top_p, seed=cfg.seed,
                            repetition_penalty=cfg.repetition_penalty or 1.0)  # fmt: skip
    served = {}
    if cfg.api:
        backends = {cfg.api_model: api_backend(cfg.api, cfg.api_model, cfg.api_key_env, cfg.retries, cfg.timeout,
                                               send_extensions=cfg.repetition_penalty is not None)}  # fmt: skip
    else:
        from dataclasses import replace

        from corral.serve.backends import LocalBackend
        from corral.serve.models import load_served_models

        if cfg.repetition_penalty is None:
            params = replace(params, repetition_penalty=1.1)
        print(f"loading {', '.join(cfg.models or [EMBEDDED_MODEL])} ...", flush=True)
        served = load_served_models(cfg.models or [EMBEDDED_MODEL], template=cfg.template, dtype=cfg.dtype,
                                    max_batch=cfg.max_batch)  # fmt: skip
        backends = {name: LocalBackend(s.engine, s.template, s.adapter) for name, s in served.items()}
    print(f"{picked}; answers -> {answers_dir}/", flush=True)
    try:
        stats = generate_answers(backends, questions, answers_dir, params, temperature=cfg.temperature,
                                 system=cfg.system, concurrency=cfg.concurrency)  # fmt: skip
    finally:
        if served:
            from corral.serve.models import close_all

            close_all(served)
    if cfg.fastchat_answers:
        from corral.eval.fastchat import write_fastchat_answers

        for written in write_fastchat_answers(answers_dir, cfg.output_dir, list(stats)):
            print(f"FastChat layout: {written}")
    failed = False
    for model, s in stats.items():
        print(f"{model}: {s['new']} answered now, {s['done_before']} already in {s['file']}"
              + (f"; {len(s['errors'])} failed (asked again next run), first: {s['errors'][0]}" if s["errors"] else ""))
        failed |= bool(s["errors"])
    if failed:
        sys.exit("corral judge answer: some questions were not answered (see above); run the same command again")
    return stats


def grade(cfg: JudgeGradeConfig):
    from corral.eval.answer import answered_models, load_answers
    from corral.eval.judge import build_tasks, grade as run_grade, load_prompts

    if not cfg.judge_api:
        raise ValueError("judge_api: set the judge's OpenAI-compatible URL (--judge-api http://HOST/v1)")
    questions, picked = load_questions(cfg.questions, cfg.limit, cfg.limit_seed)
    out = Path(cfg.output_dir)
    answers_dir = Path(cfg.answers_dir) if cfg.answers_dir else out / "answers"
    models = cfg.models or answered_models(answers_dir)
    needed = list(dict.fromkeys(models + ([cfg.baseline] if cfg.baseline else [])))
    if len(needed) < (1 if cfg.mode == "single" else 2):
        raise ValueError(f"mode={cfg.mode} needs {'one model' if cfg.mode == 'single' else 'two models'} with answers "
                         f"in {answers_dir} (found: {', '.join(needed) or 'none'})")  # fmt: skip
    answers = load_answers(answers_dir, needed)
    prompts = load_prompts(cfg.prompts or None)
    tasks, missing = build_tasks(cfg.mode, questions, answers, needed, prompts, cfg.judge_model, baseline=cfg.baseline,
                                 swap=cfg.swap, reference_categories=cfg.reference_categories,
                                 constrained=cfg.constrained, scoring=cfg.scoring, top_logprobs=cfg.top_logprobs,
                                 reason_chars=cfg.constrained_reason_chars)  # fmt: skip
    judge = judge_client(cfg.judge_api, cfg.judge_model, cfg.judge_key_env, cfg.retries, cfg.timeout)
    params = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature)
    path = out / "judgments" / f"{cfg.mode}.jsonl"
    how = "".join([", verdicts constrained to a JSON schema" if cfg.constrained else "",
                   f", scoring=expected (top_logprobs={cfg.top_logprobs})" if cfg.scoring == "expected" else ""])
    print(f"judge {cfg.judge_model} at {cfg.judge_api} ({prompts.kind} prompts from {prompts.path}{how}): {len(tasks)} "
          f"{cfg.mode} judgments of {', '.join(needed)} on {picked} -> {path}", flush=True)  # fmt: skip
    result = run_grade(tasks, judge, params, path, concurrency=cfg.concurrency)
    result.missing_answers = missing
    print(result.summary())
    if cfg.fastchat_judgments:
        from corral.eval.fastchat import write_fastchat_judgments

        for written in write_fastchat_judgments(out / "judgments", out):
            print(f"FastChat layout: {written}")
    if result.errors:
        sys.exit(f"corral judge grade: {len(result.errors)} judgments failed; run the same command again to ask only those")
    return result


def report(cfg: JudgeReportConfig) -> dict:
    from corral.atomic import read_jsonl
    from corral.eval.agreement import read_votes
    from corral.eval.answer import answered_models, load_answers
    from corral.eval.report import write_report

    out = Path(cfg.output_dir)
    extra: dict[str, list] = {}
    if cfg.fastchat:
        from corral.eval.fastchat import read_fastchat_judgments

        questions = read_questions(cfg.questions)
        for path in cfg.fastchat:
            for record in read_fastchat_judgments(path, questions):
                extra.setdefault(record["mode"], []).append(record)
    votes = [vote for path in cfg.votes for vote in read_votes(path)]
    answers_dir = Path(cfg.answers_dir) if cfg.answers_dir else out / "answers"
    pairwise = read_jsonl(out / "judgments" / "pairwise.jsonl") + extra.get("pairwise", [])
    answers = None  # read for the answers' lengths only where pairwise judgments do not record them (FastChat's)
    if cfg.answers_dir or (answers_dir.is_dir() and any(r.get("length_1") is None for r in pairwise)):
        answers = load_answers(answers_dir, answered_models(answers_dir))
    paths = write_report(out / "judgments", out, baseline=cfg.baseline, rounds=cfg.bootstrap, seed=cfg.seed,
                         extra=extra, votes=votes, answers=answers)  # fmt: skip
    print(paths["markdown"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return paths
