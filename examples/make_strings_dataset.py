"""Regenerates the embedded recipe's bundled dataset (src/automoe/data/strings_*.jsonl).

One deterministic string task a tiny MoE learns on a CPU in a minute or two: the prompt is a word, the
completion that word reversed. (Mixing in "sort the letters" or "upper-case it", or even an instruction
prefix like "reverse: ", made a 0.2M-parameter model need several times longer.) Validation
words never occur in the training rows, so exact match on them measures the rule learned, not memorised
answers.
"""

import json
import random
from pathlib import Path


def main() -> None:
    rng = random.Random(1234)
    words: set[str] = set()
    while len(words) < 4200:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    out = Path(__file__).resolve().parents[1] / "src" / "automoe" / "data"
    for name, chunk in (("strings_train.jsonl", ordered[:4000]), ("strings_val.jsonl", ordered[4000:])):
        with open(out / name, "w") as f:
            for word in chunk:
                f.write(json.dumps({"prompt": word, "completion": word[::-1]}) + "\n")


if __name__ == "__main__":
    main()
