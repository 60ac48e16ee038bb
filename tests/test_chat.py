"""format_chat must give exactly the ids of tokenizer.apply_chat_template, and say who said each token."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_jax.chat import FRAME, ROLES, ChatFormatter, format_chat
from sae_jax.tokenizer import llama3_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": "  \n\tpadded question?  \n"}, {"role": "assistant", "content": "\n\nAnswer.\n\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "   "}],
    [{"role": "user", "content": "Ünïcödé — 你好 😀 «quotes»"}, {"role": "assistant", "content": "Ça va ?\n- a\n- b"}],
    [{"role": "user", "content": "literal <|eot_id|> and <|start_header_id|>x"}, {"role": "assistant", "content": "ok"}],
    [{"role": "assistant", "content": "I start."}, {"role": "assistant", "content": "Twice."}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return llama3_tokenizer(tmp_path_factory.getbasetemp() / "sae_jax_cache")  # shared by this session's modules


def reference(tok, conv, prompt=False):
    return tok.apply_chat_template(conv, tokenize=True, return_dict=False, add_generation_prompt=prompt)


@pytest.mark.parametrize("prompt", [False, True])
def test_ids_equal_apply_chat_template(tok, prompt):
    for conv in CONVERSATIONS:
        assert format_chat(tok, conv, add_generation_prompt=prompt).input_ids == reference(tok, conv, prompt), conv


PIECES = list("ab Z1.\n\t é你😀'-") + ["  ", "<|eot_id|>", "\r\n", "don't", " the", "\n\n"]
TURN_TEXT = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ROLES), TURN_TEXT), min_size=1, max_size=4))
def test_ids_equal_apply_chat_template_random(tok, turns):
    conv = [{"role": r, "content": c} for r, c in turns]
    assert format_chat(tok, conv).input_ids == reference(tok, conv)


def test_many_equals_one_by_one(tok):
    convs = [*CONVERSATIONS, [], CONVERSATIONS[1]]
    for prompt in (False, True):
        assert ChatFormatter(tok).many(convs, prompt) == [format_chat(tok, c, prompt) for c in convs]


def test_roles_and_special_flags(tok):
    out = format_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello there\n"}])
    assert out.input_ids == [128000, 128006, 882, 128007, 271, 13347, 128009,
                             128006, 78191, 128007, 271, 9906, 1070, 128009]
    u, a, F = 1, 2, FRAME
    assert out.roles == [F, F, F, F, F, u, F, F, F, F, F, a, a, F]
    assert out.special == [True, True, False, True, False, False, True, True, False, True, False, False, False, True]
    assert [i for i, m in zip(out.input_ids, out.mask("assistant")) if m] == [9906, 1070]
    assert tok.decode([i for i, m in zip(out.input_ids, out.mask("user")) if m]) == "Hi"


def test_generation_prompt_and_empty(tok):
    out = format_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out.input_ids[-4:] == [128006, 78191, 128007, 271] and out.roles[-4:] == [FRAME] * 4
    assert format_chat(tok, []) == ([], [], [])


@pytest.mark.parametrize("conv, message", [
    ([{"role": "bot", "content": "x"}], r"^conversation\[0\]\.role: expected one of \('system', 'user', 'assistant'\), found 'bot'$"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": None}],
     r"^conversation\[1\]\.content: expected a string, found NoneType$"),
    ([{"content": "x"}], r"^conversation\[0\]: expected a \{role, content\} mapping, found \{'content': 'x'\}$"),
])
def test_bad_turns_fail_in_one_line(tok, conv, message):
    with pytest.raises(ValueError, match=message):
        format_chat(tok, conv)
