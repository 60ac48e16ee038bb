"""The embedded default: a tiny Llama-3.2-architecture checkpoint and a chat dataset, made here.

`python -m sae_jax.demo DIR` writes DIR/tiny-llama (16 layers like the real
model, GQA, llama3 rope scaling, tied embeddings, rms eps 1e-5, bf16 weights,
the real 128256-token vocabulary) and DIR/chats.jsonl (LMSYS-shaped rows).
Both are deterministic; nothing is downloaded. Existing files are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sae_jax.data.demo_chats import write_demo_chats
from sae_jax.llama.tiny import write_tiny_checkpoint

MODEL = dict(num_hidden_layers=16, hidden_size=128, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
CHAT_ROWS = 4000


def prepare(directory: str | Path) -> tuple[Path, Path]:
    """(model folder, chats file) under `directory`, written if missing."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model, chats = d / "tiny-llama", d / "chats.jsonl"
    if not (model / "model.safetensors").exists():
        write_tiny_checkpoint(model, seed=0, init_std=0.1, **MODEL)
    if not chats.exists():
        write_demo_chats(chats, CHAT_ROWS, seed=0)
    return model, chats


if __name__ == "__main__":
    m, c = prepare(sys.argv[1] if len(sys.argv) > 1 else "demo")
    print(f"demo model: {m}\ndemo chats: {c}")
