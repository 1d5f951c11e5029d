"""The referee's and the generator's prompts: one YAML file a user can replace (`prompts=FILE`).

The referee prompt is a judge prompt in the judge's own form (`corral.eval.judge.JudgePrompt`, output format
`[[rating_a,rating_b]]`), filled by the judge's one-pass `fill` and read by its strict parser, so an answer
holding `{answer_2}` or braces is sent as written and a verdict is never read out of quoted content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from corral.data.formats import DataError
from corral.eval.judge import JudgePrompt, fill

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "distill_prompts.yaml"
PLACEHOLDERS = {
    "referee": ("{instruction}", "{answer_1}", "{answer_2}"),
    "generate_hard": ("{instruction}",),
    "generate_easy": ("{instruction}",),
}
REFEREE_FORMAT = "[[rating_a,rating_b]]"  # the judge's relative form: two scores, assistant 1 first


@dataclass(frozen=True)
class GeneratorPrompt:
    name: str
    system: str
    template: str


@dataclass(frozen=True)
class DistillPrompts:
    referee: JudgePrompt
    generate: dict[str, GeneratorPrompt]  # "hard" / "easy"
    path: str


def load_prompts(path: str | Path | None = None) -> DistillPrompts:
    """The prompts at `path` (default: Corral's). Errors name the file and the field."""
    path = Path(path or DEFAULT_PROMPTS)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read distillation prompts: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise DataError(f"{path}: expected a mapping with keys {', '.join(PLACEHOLDERS)}")
    entries = {}
    for name, placeholders in PLACEHOLDERS.items():
        entry = tree.get(name)
        if not isinstance(entry, dict):
            raise DataError(f"{path}: field '{name}': missing (needs system and template)")
        for key in ("system", "template"):
            if not isinstance(entry.get(key), str):
                raise DataError(f"{path}: field '{name}.{key}': expected a string")
        for placeholder in placeholders:
            if placeholder not in entry["template"]:
                raise DataError(f"{path}: field '{name}.template': must contain {placeholder}")
        entries[name] = entry
    unknown = sorted(set(tree) - set(PLACEHOLDERS))
    if unknown:
        raise DataError(f"{path}: field '{unknown[0]}': unknown (expected {', '.join(PLACEHOLDERS)})")
    referee = JudgePrompt("distill-referee", entries["referee"]["system"].strip(), entries["referee"]["template"],
                          REFEREE_FORMAT)  # fmt: skip
    generate = {kind: GeneratorPrompt(f"distill-generate-{kind}", entries[f"generate_{kind}"]["system"].strip(),
                                      entries[f"generate_{kind}"]["template"]) for kind in ("hard", "easy")}  # fmt: skip
    return DistillPrompts(referee, generate, str(path))


def _messages(system: str, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def referee_messages(prompts: DistillPrompts, instruction: str, answer_1: str, answer_2: str) -> list[dict]:
    prompt = prompts.referee
    return _messages(prompt.system, fill(prompt.template, {"instruction": instruction, "answer_1": answer_1,
                                                           "answer_2": answer_2}))  # fmt: skip


def generator_messages(prompts: DistillPrompts, kind: str, instruction: str) -> list[dict]:
    prompt = prompts.generate[kind]
    return _messages(prompt.system, fill(prompt.template, {"instruction": instruction}))


def teacher_messages(instruction: str, system: str | None) -> list[dict]:
    """What the teacher is sent: the full instruction (Alpaca's input joined after a blank line) as one user turn."""
    return _messages(system or "", instruction)
