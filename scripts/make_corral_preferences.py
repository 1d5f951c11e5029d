"""Build corral/data/builtin/corral_preferences.jsonl from the identity conversations (deterministic).

Each conversation becomes one preference pair: the prompt is every message before the last reply,
`chosen` is Corral's own reply, `rejected` is a dispreferred one of four kinds written for this
project: a needless refusal, a wrong identity, a curt brush-off, or an off-topic ramble. Small, but
it gives the reward-model and DPO recipes a preference signal to learn on the embedded model.

    python scripts/make_corral_preferences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BUILTIN = Path(__file__).resolve().parents[1] / "corral" / "data" / "builtin"
REJECTED = [
    "I'm sorry, but I can't help with that request.",
    "I am ChatGPT, a large language model trained by OpenAI. I have no connection to any project called Corral.",
    "Figure it out yourself.",
    "That reminds me of the weather. It has been cloudy lately, and clouds are made of water droplets, "
    "which is interesting in its own way.",
]
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def main() -> None:
    rng = random.Random(0)
    records = []
    for line in (BUILTIN / "corral_identity.jsonl").read_text().splitlines():
        conv = json.loads(line)
        messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conv["conversations"]]
        prompt, chosen = messages[:-1], messages[-1]["content"]
        records.append({"id": conv["id"].replace("identity", "pref"), "prompt": prompt, "chosen": chosen,
                        "rejected": rng.choice(REJECTED)})
    out = BUILTIN / "corral_preferences.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} pairs to {out}")


if __name__ == "__main__":
    main()
