"""format_chat must give exactly the ids of tokenizer.apply_chat_template, and say who said each token."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_jax.chat import FRAME, ROLES, ChatFormatter, format_chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ],
    [{"role": "user", "content": "  \n\tpadded question?  \n"}, {"role": "assistant", "content": "\n\nAnswer.\n\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "   "}],
    [{"role": "user", "content": "Ünïcödé — 你好 😀 «quotes»"}, {"role": "assistant", "content": "Ça va ?\n- a\n- b"}],
    [
        {"role": "user", "content": "literal <|eot_id|> and <|start_header_id|>x"},
        {"role": "assistant", "content": "ok"},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "assistant", "content": "Twice."}],
]


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
    assert out.input_ids == [
        128000,
        128006,
        882,
        128007,
        271,
        13347,
        128009,
        128006,
        78191,
        128007,
        271,
        9906,
        1070,
        128009,
    ]
    u, a, F = 1, 2, FRAME
    assert out.roles == [F, F, F, F, F, u, F, F, F, F, F, a, a, F]
    assert out.special == [True, True, False, True, False, False, True, True, False, True, False, False, False, True]
    assert [i for i, m in zip(out.input_ids, out.mask("assistant")) if m] == [9906, 1070]
    assert tok.decode([i for i, m in zip(out.input_ids, out.mask("user")) if m]) == "Hi"


def test_generation_prompt_and_empty(tok):
    out = format_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out.input_ids[-4:] == [128006, 78191, 128007, 271] and out.roles[-4:] == [FRAME] * 4
    assert format_chat(tok, []) == ([], [], [])


@pytest.mark.parametrize(
    "conv, message",
    [
        (
            [{"role": "bot", "content": "x"}],
            r"^conversation\[0\]\.role: expected one of \('system', 'user', 'assistant'\), found 'bot'$",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": None}],
            r"^conversation\[1\]\.content: expected a string, found NoneType$",
        ),
        ([{"content": "x"}], r"^conversation\[0\]: expected a \{role, content\} mapping, found \{'content': 'x'\}$"),
    ],
)
def test_bad_turns_fail_in_one_line(tok, conv, message):
    with pytest.raises(ValueError, match=message):
        format_chat(tok, conv)


# --- a tokenizer folder with its own, dated template ------------------------------------------

# Written here after Llama-3.2-Instruct's behaviour: BOS, a system block dated by `date_string`
# (else strftime_now, else 26 Jul 2024) holding the first message when it is a system one, then the
# trimmed turns.
DATED_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n'"
    " + 'Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def dated(tok, tmp_path_factory):
    """A locally written tokenizer folder: the Llama-3 vocabulary with the dated template, loaded as a folder."""
    from sae_jax.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("dated_tokenizer")
    tok.chat_template, saved = DATED_TEMPLATE, tok.chat_template
    try:
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = saved
    return load_tokenizer(str(folder))


@pytest.mark.parametrize("prompt", [False, True])
def test_own_template_gives_apply_chat_template_ids_with_the_pinned_date(dated, prompt):
    for conv in CONVERSATIONS:
        ref = dated.apply_chat_template(
            conv, tokenize=True, return_dict=False, add_generation_prompt=prompt, date_string="26 Jul 2024"
        )
        assert format_chat(dated, conv, prompt, date="26 Jul 2024").input_ids == ref, conv


def test_own_template_without_a_pinned_date_renders_today(dated):
    import datetime

    conv = CONVERSATIONS[0]
    today = datetime.datetime.now().strftime("%d %b %Y")
    ids = format_chat(dated, conv).input_ids
    assert ids == dated.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert f"Today Date: {today}\n\n" in dated.decode(ids)


def test_own_template_roles(dated):
    conv = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    out = format_chat(dated, conv, date="26 Jul 2024")
    text = dated.decode(out.input_ids)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
    )
    said = {r: dated.decode([i for i, m in zip(out.input_ids, out.mask(r)) if m]) for r in ROLES}
    assert said == {"system": "Be brief.", "user": "Hi", "assistant": "Hello"}  # the date lines are FRAME
    assert [i for i, s in zip(out.input_ids, out.special) if s] == [128000] + [128006, 128007, 128009] * 3
    assert ChatFormatter(dated, "26 Jul 2024").many([conv, []]) == [out, ([], [], [])]


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ROLES), TURN_TEXT), min_size=1, max_size=4))
def test_own_template_ids_random(dated, turns):
    conv = [{"role": r, "content": c} for r, c in turns]
    ref = dated.apply_chat_template(conv, tokenize=True, return_dict=False, date_string="1 Jan 2025")
    out = format_chat(dated, conv, date="1 Jan 2025")
    assert out.input_ids == ref
    for (
        r
    ) in ROLES:  # each role's tokens decode to its contents, trimmed (the system one first, as the template puts it)
        said = [c.strip() for i, (role, c) in enumerate(turns) if role == r and not (r == "system" and i == 0)]
        first = [turns[0][1].strip()] if turns[0][0] == r == "system" else []
        assert dated.decode([i for i, m in zip(out.input_ids, out.mask(r)) if m]) == "".join(first + said)


def test_offline_tokenizer_keeps_the_plain_format_and_ignores_a_date(tok):
    conv = CONVERSATIONS[1]
    assert format_chat(tok, conv, date="1 Jan 2000") == format_chat(tok, conv)
    assert "Today Date" not in tok.decode(format_chat(tok, conv).input_ids)


def test_training_text_renders_the_folder_template_with_data_text_chat_date(dated, tmp_path):
    import json

    from sae_jax.config import TextConfig
    from sae_jax.data.text import TextSource

    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"conversation": conv}) + "\n")
    cfg = TextConfig(
        path=str(tmp_path / "rows.jsonl"),
        tokenizer="unused",
        chat_date="26 Jul 2024",
        context_size=64,
        seqs_per_batch=1,
        streaming=False,
        cache_dir=str(tmp_path / "cache"),
    )
    batch = TextSource(cfg, tokenizer=dated).next_batch()
    ids = batch.input_ids[0][batch.attention_mask[0] == 1].tolist()
    assert ids == dated.apply_chat_template(conv, tokenize=True, return_dict=False, date_string="26 Jul 2024")
