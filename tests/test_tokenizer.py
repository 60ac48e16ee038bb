"""The offline Llama-3 tokenizer against tiktoken itself (same file, same regex, same specials): ids must be equal."""

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from sae_jax import tokenizer as tk

TEXTS = [
    "Hello world",
    "  héllo\n\n wörld 12345 😀 naïve café",
    "don't I'LL we've THEY'RE it's",
    "def f(x):\n    return x**2  # square\n\n\n",
    "你好，世界！ Привет, мир. مرحبا",
    "a" * 300 + " " * 40 + "\t\t\r\n\r\n" + "9" * 17,
    "The <|eot_id|> marker and <|begin_of_text|> inside text.",
    "",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "sae_jax_cache"  # shared by this session's modules


@pytest.fixture(scope="module")
def tok(cache):
    return tk.llama3_tokenizer(cache)


@pytest.fixture(scope="module")
def reference():
    ranks = load_tiktoken_bpe(str(tk.tiktoken_file()))
    specials = {t: tk.N_BASE + i for i, t in enumerate(tk.SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="llama3", pat_str=tk.PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_ids_equal_tiktoken(tok, reference):
    for text in TEXTS:
        expected = reference.encode(text, allowed_special="all")
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
        assert tok.decode(expected) == text


def test_known_ids(tok):
    # Llama-3's ids for "Hello world" and " there", as published with the model.
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok(" there", add_special_tokens=False)["input_ids"] == [1070]


def test_special_token_ids(tok):
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(tok) == 128256 and len(tk.SPECIAL_TOKENS) == 256
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128009)
    assert tk.special_ids(tok) == frozenset(range(128000, 128256))


def test_chat_template_renders_llama3_instruct(tok):
    conv = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_cache_is_reused(tok, cache, monkeypatch):
    first = tok
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("llama3-tokenizer-")]
    assert (folder / "tokenizer.json").is_file()

    def no_conversion(*a, **k):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(tk, "convert_llama3", no_conversion)
    second = tk.load_tokenizer(tk.OFFLINE_NAME, cache_dir=cache)
    assert second("Hello world")["input_ids"] == first("Hello world")["input_ids"]
    assert second.chat_template == tk.CHAT_TEMPLATE
    # A plain tokenizer folder goes through AutoTokenizer and gives the same ids.
    assert tk.load_tokenizer(str(folder))(TEXTS[1])["input_ids"] == first(TEXTS[1])["input_ids"]


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: expected a tokenizer folder, found no such folder$"):
        tk.load_tokenizer(str(tmp_path / "nope"))
