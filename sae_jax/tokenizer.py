"""The Llama-3 tokenizer, built offline from the tiktoken file that `llama-models` ships.

`llama3_tokenizer()` converts `llama_models/llama3/tokenizer.model` (128000 BPE
ranks) with transformers' `TikTokenConverter`, appends the 256 special tokens
under the names the Llama-3.2 checkpoints on the hub use, and sets the Llama-3
Instruct chat template. Conversion takes a few seconds, so the result is saved
once under `cache_dir` (keyed by the file's hash) and loaded from there after.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

OFFLINE_NAME = "llama3-offline"
DEFAULT_CACHE = Path.home() / ".cache" / "sae_jax"

# Llama-3's pre-tokenizer regex (llama_models.llama3.tokenizer.Tokenizer.pat_str).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_BASE = 128000

# Ids 128000..128255, named as in Llama-3.2-1B-Instruct's tokenizer.json
# (llama-models names 128005 `<|step_id|>` and 128011 `<|image|>` instead).
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"

# Meta-Llama-3-8B-Instruct's template: BOS, then per message a header, the trimmed
# content and <|eot_id|>. (Llama-3.2's own template also prepends a dated system turn.)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiktoken_file() -> Path:
    """Path of `llama_models/llama3/tokenizer.model`, found without importing llama_models."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llama_models: package not installed; it ships llama3/tokenizer.model")
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def convert_llama3(model_file: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the tokenizer from a Llama-3 tiktoken file (no cache; a few seconds)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(model_file), pattern=PATTERN, extra_special_tokens=SPECIAL_TOKENS
    ).converted()
    # As in the hub's tokenizer.json: `tokenizer(text)` prepends BOS.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, N_BASE)]
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    if len(tok) != N_BASE + len(SPECIAL_TOKENS) or tok.convert_tokens_to_ids(EOT) != 128009:
        raise ValueError(f"{model_file}: expected 128000 BPE ranks, found {len(tok) - len(SPECIAL_TOKENS)}")
    return tok


def llama3_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer (128256 ids, bos 128000), converted once and cached in `cache_dir`."""
    src = tiktoken_file()
    recipe = repr((PATTERN, SPECIAL_TOKENS, CHAT_TEMPLATE)).encode()  # a changed recipe gets a new folder
    digest = hashlib.sha256(src.read_bytes() + recipe).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    target = root / f"llama3-tokenizer-{digest}"
    if not (target / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-tokenizer-"))
        try:
            convert_llama3(src).save_pretrained(tmp)
            os.replace(tmp, target)  # atomic
        except OSError:
            if not (target / "tokenizer.json").is_file():  # else another process got there first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target, local_files_only=True)


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of all special tokens (for Llama-3: 128000..128255)."""
    added = (i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return frozenset([*added, *tokenizer.all_special_ids])


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """`"llama3-offline"` -> `llama3_tokenizer(cache_dir)`; anything else -> `AutoTokenizer`."""
    if name_or_path == OFFLINE_NAME:
        return llama3_tokenizer(cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if path.exists() or name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{name_or_path}: expected a tokenizer folder, found no such folder")
    return AutoTokenizer.from_pretrained(name_or_path)  # a hub id
