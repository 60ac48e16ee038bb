"""Llama-3 Instruct chat formatting, token by token, with who said each token.

A tokenizer whose chat template is its own (a model folder's, e.g.
Llama-3.2-Instruct's, which opens every conversation with a dated system block)
is rendered with `tokenizer.apply_chat_template`: the ids are exactly its ids,
with `date` as the template's `date_string` ("Today Date: ..."; None lets the
template choose: the day it runs where `strftime_now` exists). Who said each
token comes from a second rendering with a marker in place of each content.

The offline tokenizer (`llama3-offline`), and any tokenizer without a template,
get the plain Llama-3 Instruct format, no system block and no date:
`<|begin_of_text|>` + per turn `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>`
built from segments: special tokens split the rendered string, so tokenizing
each piece between them gives exactly the ids `apply_chat_template` gives for
the whole string with that template (tested), and the turn of every token is known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from sae_jax.tokenizer import CHAT_TEMPLATE, special_ids

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
    """`format_chat` for one tokenizer, its special ids looked up once; `many` tokenizes in one call.

    `date` (e.g. "26 Jul 2024") pins the date a dated template renders; templates without one ignore it.
    """

    def __init__(self, tokenizer, date: str | None = None):
        self.tokenizer, self.date = tokenizer, date
        self.start, self.end, self.eot = (_special_id(tokenizer, t) for t in HEADER_AND_EOT)
        self.specials = special_ids(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        self.own_template = bool(template) and template != CHAT_TEMPLATE

    def __call__(self, conversation: Sequence[dict], add_generation_prompt: bool = False) -> ChatTokens:
        return self.many([conversation], add_generation_prompt)[0]

    def many(self, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = False) -> list[ChatTokens]:
        """`format_chat` of each conversation, with one tokenizer call for all their pieces."""
        turns = [[check_turn(m, i) for i, m in enumerate(conv)] for conv in conversations]
        if self.own_template:
            return self._templated(turns, add_generation_prompt)
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

    def _templated(self, turns: list[list[tuple[str, str]]], add_generation_prompt: bool) -> list[ChatTokens]:
        """The tokenizer's own template: its text, tokenized in one call; roles from where each content landed."""
        texts, spans = [], []
        for conv in turns:
            text, conv_spans = self._render(conv, add_generation_prompt) if conv else ("", [])
            texts.append(text)
            spans.append(conv_spans)
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, conv_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
            # A token is content where it starts inside a message's content; headers, dates and eot are FRAME.
            roles = [next((r for a, b, r in conv_spans if a <= start < b), FRAME) for start, _ in offsets]
            out.append(ChatTokens(list(ids), roles, [i in self.specials for i in ids]))
        return out

    def _render(self, conv: list[tuple[str, str]], add_generation_prompt: bool) -> tuple[str, list[tuple[int, ...]]]:
        """(the template's text, [(start, end, role id)] of each message's content in it).

        Rendered once as is and once with a marker in place of each content: the marked text splits into the
        template's own pieces, and between them the real text holds each content as the template wrote it
        (trimmed, or as given)."""
        kwargs = {"date_string": self.date} if self.date is not None else {}
        render = lambda c: self.tokenizer.apply_chat_template(
            [{"role": r, "content": x} for (r, _), x in zip(conv, c)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        text = render([content for _, content in conv])
        marked = re.split(r"\ue000(\d+)\ue001", render([f"\ue000{i}\ue001" for i in range(len(conv))]))
        frames, order = marked[0::2], [int(i) for i in marked[1::2]]
        name = getattr(self.tokenizer, "name_or_path", "")
        if order != list(range(len(conv))):
            raise ValueError(
                f"tokenizer {name!r}: chat template drops, repeats or reorders messages "
                f"(contents rendered in order {order}); cannot tell who said each token"
            )
        pos, spans = len(frames[0]), []
        for i, (role, content) in enumerate(conv):
            if not text.startswith(frames[i], pos - len(frames[i])):
                break
            found = next(
                (
                    c
                    for c in (content.strip(), content)
                    if text.startswith(c, pos) and text.startswith(frames[i + 1], pos + len(c))
                ),
                None,
            )
            if found is None:
                break
            spans.append((pos, pos + len(found), ROLES.index(role)))
            pos += len(found) + len(frames[i + 1])
        if len(spans) != len(conv) or pos != len(text):
            raise ValueError(
                f"tokenizer {name!r}: chat template changes message {len(spans)}'s content beyond "
                "trimming it; cannot tell who said each token"
            )
        return text, spans


def format_chat(
    tokenizer, conversation: Sequence[dict], add_generation_prompt: bool = False, date: str | None = None
) -> ChatTokens:
    """Token ids of `conversation` ([{role, content}, ...]): the tokenizer's own chat template where it has one
    (its `date_string` pinned to `date` where given), else the plain Llama-3 Instruct format."""
    return ChatFormatter(tokenizer, date)(conversation, add_generation_prompt)


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
        raise ValueError(
            f"{path}: expected a list of {{role, content}} turns or an object with 'conversation', "
            f"found {type(value).__name__}"
        )
    return value
