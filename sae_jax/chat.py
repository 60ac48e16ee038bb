"""Llama-3 Instruct chat formatting, token by token, with who said each token.

`format_chat` builds the ids of
`<|begin_of_text|>` + per turn `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>`
from segments: special tokens split the rendered string, so tokenizing each
piece between them gives exactly the ids `tokenizer.apply_chat_template`
gives for the whole string (tested), and the turn of every token is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

from sae_jax.tokenizer import special_ids

ROLES = ("system", "user", "assistant")  # role id = index here
FRAME = -1  # role id of BOS, header, role-name, "\n\n" and eot tokens
HEADER_AND_EOT = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class ChatTokens(NamedTuple):
    """One formatted conversation; all three lists have length T."""

    input_ids: list[int]  # [T]
    roles: list[int]  # [T] ROLES index of the message content a token belongs to, FRAME otherwise
    special: list[bool]  # [T] True where the id is a special token (BOS, header ids, eot, ...)

    def mask(self, role: str) -> list[bool]:
        """[T] True on the content tokens of `role`'s messages."""
        r = ROLES.index(role)
        return [x == r for x in self.roles]


class ChatFormatter:
    """`format_chat` for one tokenizer, its special ids looked up once; `many` tokenizes in one call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start, self.end, self.eot = (_special_id(tokenizer, t) for t in HEADER_AND_EOT)
        self.specials = special_ids(tokenizer)

    def __call__(self, conversation: Sequence[dict], add_generation_prompt: bool = False) -> ChatTokens:
        return self.many([conversation], add_generation_prompt)[0]

    def many(self, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = False) -> list[ChatTokens]:
        """`format_chat` of each conversation, with one tokenizer call for all their pieces."""
        turns = [[check_turn(m, i) for i, m in enumerate(conv)] for conv in conversations]
        if add_generation_prompt:
            turns = [[*t, ("assistant", None)] for t in turns]  # the header and "\n\n", no content, no eot
        texts = [x for conv in turns for role, content in conv for x in (role, "\n\n" + (content or "").strip())]
        pieces = iter(self.tokenizer(["\n\n", *texts], add_special_tokens=False)["input_ids"])
        newline = next(pieces)
        return [self._assemble(conv, pieces, newline) for conv in turns]

    def _assemble(self, turns: list[tuple[str, str | None]], pieces, newline: list[int]) -> ChatTokens:
        if not turns:
            return ChatTokens([], [], [])
        ids, roles = [self.tokenizer.bos_token_id], [FRAME]
        for role, content in turns:
            name, body = next(pieces), next(pieces)
            n_frame = len(newline) if body[: len(newline)] == newline else 0
            ids += [self.start, *name, self.end, *body]
            roles += [FRAME] * (len(name) + 2 + n_frame) + [ROLES.index(role)] * (len(body) - n_frame)
            if content is not None:
                ids.append(self.eot)
                roles.append(FRAME)
        return ChatTokens(ids, roles, [i in self.specials for i in ids])


def format_chat(tokenizer, conversation: Sequence[dict], add_generation_prompt: bool = False) -> ChatTokens:
    """Token ids of `conversation` ([{role, content}, ...]) in the Llama-3 Instruct format."""
    return ChatFormatter(tokenizer)(conversation, add_generation_prompt)


def _special_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no special token {token}; not a Llama-3 tokenizer")
    return i


def check_turn(message, i: int) -> tuple[str, str]:
    """(role, content) of turn i, or a one-line ValueError naming it."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"conversation[{i}]: expected a {{role, content}} mapping, found {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"conversation[{i}].role: expected one of {ROLES}, found {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"conversation[{i}].content: expected a string, found {type(content).__name__}")
    return role, content


def read_conversation(path: str) -> list:
    """A JSON list of {role, content}, or an object (or first jsonl row) with a 'conversation' list."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a JSON conversation)")
    text = p.read_text()
    try:
        value = json.loads(text.splitlines()[0] if p.suffix == ".jsonl" else text)
    except (json.JSONDecodeError, IndexError):
        raise ValueError(f"{path}: expected JSON, found unparseable text") from None
    value = value.get("conversation") if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a list of {{role, content}} turns or an object with 'conversation', found {type(value).__name__}")
    return value
