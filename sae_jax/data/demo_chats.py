"""A small LMSYS-Chat-1M-shaped jsonl of made-up conversations, generated locally.

Each row is `{"conversation_id", "model", "turn", "language", "conversation":
[{"role": "user", "content"}, {"role": "assistant", "content"}, ...]}` with 1 to
3 exchanges of template English, a function of (n_rows, seed) only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NOUNS = (
    "river garden computer recipe planet teacher engine violin market library forest bridge "
    "algorithm battery castle dragon harbor island journey kitchen lantern mountain novel orchard "
    "painting question rocket sandwich telescope umbrella village window yogurt zebra café résumé"
).split()
ADJECTIVES = "quick quiet ancient bright curious gentle heavy hidden modern narrow simple strange warm".split()
VERBS = "build explain describe compare improve repair paint measure translate plan cook write".split()
QUESTIONS = (
    "How do I {verb} a {adj} {noun}?",
    "Can you {verb} the {noun} for me?",
    "What is the difference between a {noun} and a {noun2}?",
    "Write a short poem about a {adj} {noun}.",
    "Why is the {noun} so {adj}?",
    "Give me {n} ideas to {verb} my {noun}.",
    "Translate 'the {adj} {noun}' into French.",
    "  Please {verb} this: {noun}, {noun2}, {noun3}.  ",
)
SENTENCES = (
    "A {adj} {noun} is easier to {verb} than a {noun2}.",
    "First, {verb} the {noun}; then check the {noun2}.",
    "Many people {verb} a {noun} every {n} days.",
    "The {noun} was {adj}, and nobody knew why.",
    "In short: {verb} carefully, and keep the {noun} {adj}.",
    "Step {n}: {verb} the {adj} {noun} 😊",
    "Here is an example: `{verb}({noun}, {n})` returns {n2}.",
)


def _fill(rng: np.random.Generator, template: str) -> str:
    nouns = rng.choice(NOUNS, 3, replace=False)
    return template.format(
        noun=nouns[0],
        noun2=nouns[1],
        noun3=nouns[2],
        adj=rng.choice(ADJECTIVES),
        verb=rng.choice(VERBS),
        n=int(rng.integers(2, 10)),
        n2=int(rng.integers(10, 1000)),
    )


def demo_conversation(rng: np.random.Generator) -> list[dict[str, str]]:
    """1 to 3 user/assistant exchanges; replies hold 1 to 8 sentences, some in two paragraphs."""
    turns = []
    for _ in range(int(rng.integers(1, 4))):
        turns.append({"role": "user", "content": _fill(rng, rng.choice(QUESTIONS))})
        sentences = [_fill(rng, rng.choice(SENTENCES)) for _ in range(int(rng.integers(1, 9)))]
        cut = int(rng.integers(1, len(sentences) + 1))
        reply = " ".join(sentences[:cut]) + ("\n\n" + " ".join(sentences[cut:]) if cut < len(sentences) else "")
        turns.append({"role": "assistant", "content": reply})
    return turns


def write_demo_chats(path: str | Path, n_rows: int, seed: int = 0) -> Path:
    """Write `n_rows` LMSYS-shaped rows to the jsonl file `path`; the same (n_rows, seed) gives the same bytes."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_rows):
            conv = demo_conversation(rng)
            row = {
                "conversation_id": f"demo-{seed}-{i}",
                "model": "demo",
                "turn": len(conv) // 2,
                "language": "English",
                "conversation": conv,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
