"""Long real text available offline, and RULER-style needle prompts built from it."""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

STDLIB_MODULES = ["argparse.py", "typing.py", "inspect.py", "textwrap.py", "dataclasses.py", "functools.py",
                  "collections/__init__.py", "pathlib.py", "subprocess.py", "tarfile.py", "zipfile.py",
                  "email/message.py", "http/client.py", "logging/__init__.py", "unittest/case.py", "ast.py",
                  "difflib.py", "pydoc.py", "shutil.py", "threading.py", "decimal.py", "_pydecimal.py",
                  "statistics.py", "calendar.py", "configparser.py", "csv.py", "datetime.py", "_pydatetime.py"]


def stdlib_text(min_chars: int) -> str:
    """Python standard-library sources, concatenated in a fixed order until at least `min_chars` long."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in STDLIB_MODULES:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(f"# file: {name}\n{text}")
            total += len(text)
            if total >= min_chars:
                break
    if total < min_chars:
        raise ValueError(f"only {total} characters of standard-library source found under {root}")
    return "\n".join(parts)


def passkey_prompt(haystack_ids: list[int], tokenizer, length: int, depth: float, seed: int,
                   num_keys: int = 1) -> tuple[str, str]:
    """A document of about `length` tokens with `num_keys` named pass keys hidden in it, the asked-for one at
    relative `depth`; returns (user message, expected answer)."""
    rng = random.Random(seed)
    names = rng.sample(["red", "blue", "green", "amber", "violet", "silver", "orange", "teal"], num_keys)
    keys = [str(rng.randint(10000, 99999)) for _ in names]
    needles = [f"\nThe pass key for {n} is {k}. Remember it: the {n} pass key is {k}.\n" for n, k in zip(names, keys)]
    question = f"\n\nWhat is the pass key for {names[0]}? Answer with the number only."
    budget = length - sum(len(tokenizer.encode(s, add_special_tokens=False)) for s in needles) - 60
    body = tokenizer.decode(haystack_ids[:budget])
    depths = [depth] + [rng.random() for _ in names[1:]]
    pieces, last = [], 0
    for d, needle in sorted(zip(depths, needles)):
        cut = body.rfind("\n", 0, max(1, int(len(body) * d))) + 1
        pieces += [body[last:cut], needle]
        last = cut
    pieces.append(body[last:])
    return "".join(pieces) + question, keys[0]
