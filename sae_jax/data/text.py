"""Text rows to fixed-shape token batches: [S, T] ids, attention mask and keep mask.

Rows come from a `datasets` hub id or a local .jsonl/.json/.parquet file. A row's
`field` is either a list of {role, content} turns (LMSYS-Chat-1M's
`conversation`), formatted with `sae_jax.chat.format_chat`, or a string,
tokenized after BOS. Each row becomes one sequence truncated to T tokens, or,
with `pack`, rows are concatenated and cut into T-token chunks (which then
attend across row boundaries, as in SAELens). Rows with no token to keep are
skipped; the stream wraps around at the end of the split. The position is
(epoch, row, offset): rows consumed in this epoch, and tokens of the current
row already emitted (only ever non-zero with `pack`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from sae_jax.chat import ChatFormatter, check_turn
from sae_jax.config import TEXT_FILE_SUFFIXES as FILE_BUILDERS
from sae_jax.config import TextConfig
from sae_jax.tokenizer import load_tokenizer, special_ids

READ_ROWS = 64  # rows tokenized per tokenizer call (the Rust tokenizer spreads a call over cores)


class TokenBatch(NamedTuple):
    input_ids: np.ndarray  # [S, T] int32, padded with the pad (or eos) id
    attention_mask: np.ndarray  # [S, T] int32, 0 on padding
    keep: np.ndarray  # [S, T] bool, the positions whose activations are used


def open_rows(cfg: TextConfig):
    """The `datasets` Dataset (or IterableDataset if streaming) of `cfg.path`."""
    import datasets

    local = Path(cfg.path).expanduser()
    if local.suffix in FILE_BUILDERS or local.exists():
        if not local.is_file():
            raise FileNotFoundError(f"{cfg.path}: no such file")
        if local.suffix not in FILE_BUILDERS:
            raise ValueError(f"{cfg.path}: expected a .jsonl, .json or .parquet file, found suffix {local.suffix!r}")
        return datasets.load_dataset(
            FILE_BUILDERS[local.suffix],
            data_files=str(local),
            split="train",
            streaming=cfg.streaming,
            cache_dir=cfg.cache_dir,
        )
    return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming, cache_dir=cfg.cache_dir)


class TextSource:
    """Endless [S, T] token batches from the rows of `cfg.path`; deterministic given the position."""

    def __init__(self, cfg: TextConfig, tokenizer=None):
        """`tokenizer` defaults to `load_tokenizer(cfg.tokenizer)`."""
        self.cfg, self.tokenizer = cfg, load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
        self.rows = open_rows(cfg)
        tok = self.tokenizer
        self.special = np.array(sorted(special_ids(tok)), dtype=np.int64)
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.chat = ChatFormatter(tok, cfg.chat_date)
        self.epoch, self.row, self.offset = 0, 0, 0
        self._it: Iterator | None = None  # rows from `_read_start + len(_read)` on
        self._read_start, self._read = 0, []  # tokens of the rows read ahead, from row `_read_start`
        self._unusable = 0  # consecutive rows with nothing to keep
        first = list(self.rows.take(1))
        if not first:
            raise ValueError(f"{cfg.path}: no rows")
        self._tokenize(first, 0)  # a missing or malformed field fails here, not mid-run

    def next_batch(self) -> TokenBatch:
        """The next S sequences: [S, T] int32 ids, [S, T] int32 attention mask, [S, T] bool keep."""
        S, T = self.cfg.seqs_per_batch, self.cfg.context_size
        ids = np.full((S, T), self.pad_id, dtype=np.int32)
        mask = np.zeros((S, T), dtype=np.int32)
        for s in range(S):
            seq = self._sequence(T)
            ids[s, : len(seq)], mask[s, : len(seq)] = seq, 1
        keep = mask.astype(bool)
        if self.cfg.exclude_special:
            keep &= ~np.isin(ids, self.special)
        return TokenBatch(ids, mask, keep)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.row, self.offset = int(state["epoch"]), int(state["row"]), int(state["offset"])
        self._it, self._read = None, []

    # --- internals --------------------------------------------------------------------

    def _sequence(self, T: int) -> list[int]:
        """Up to T tokens: the current row truncated, or, with `pack`, exactly T tokens across rows."""
        out: list[int] = []
        while len(out) < T:
            tokens = self._row_tokens()
            take = tokens[self.offset : self.offset + T - len(out)]
            out += take
            self.offset += len(take)
            if self.offset == len(tokens) or not self.cfg.pack:
                self._next_row()
            if not self.cfg.pack:
                break
        return out

    def _row_tokens(self) -> list[int]:
        """Tokens of the current row, skipping rows with nothing to keep."""
        while True:
            i = self.row - self._read_start
            if not 0 <= i < len(self._read):
                self._read_ahead()
                continue
            if self._usable(self._read[i]):
                self._unusable = 0
                return self._read[i]
            self._unusable += 1
            self.row, self.offset = self.row + 1, 0

    def _next_row(self) -> None:
        self.row, self.offset = self.row + 1, 0

    def _read_ahead(self) -> None:
        """Tokenize the next READ_ROWS rows from `self.row`, wrapping to the next epoch at the end."""
        if self._it is None:
            self._it = iter(self.rows.skip(self.row) if self.row else self.rows)
        rows = list(itertools.islice(self._it, READ_ROWS))
        if not rows:
            if self.row == 0 or self._unusable >= self.row:
                raise ValueError(f"{self.cfg.path}: no row has tokens to keep in field {self.cfg.field!r}")
            self.epoch, self.row, self._it = self.epoch + 1, 0, None
            return
        self._read_start, self._read = self.row, self._tokenize(rows, self.row)

    def _usable(self, tokens: list[int]) -> bool:
        if not self.cfg.exclude_special:
            return bool(tokens)
        return bool(np.any(~np.isin(np.asarray(tokens, dtype=np.int64), self.special)))

    def _tokenize(self, rows: list[dict], first: int) -> list[list[int]]:
        """Token ids of each row (rows `first`, `first` + 1, ...): chat-formatted turns, or BOS + text."""
        values = [self._value(row, first + j) for j, row in enumerate(rows)]
        out: list[list[int] | None] = [None] * len(values)
        texts = [j for j, v in enumerate(values) if isinstance(v, str)]
        if texts:
            bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
            ids = self.tokenizer([values[j] for j in texts], add_special_tokens=False)["input_ids"]
            for j, x in zip(texts, ids):
                out[j] = bos + x
        chats = [j for j, v in enumerate(values) if not isinstance(v, str)]
        if chats:
            for j, chat in zip(chats, self.chat.many([values[j] for j in chats])):
                out[j] = chat.input_ids
        return out

    def _value(self, row: dict, index: int):
        """The row's field: a string, or a list of turns checked for shape."""
        where = f"{self.cfg.path}: row {index}"
        value = row.get(self.cfg.field)
        if value is None:
            found = sorted(k for k, v in row.items() if v is not None)
            raise ValueError(f"{where} has no field {self.cfg.field!r}; found {found}")
        if isinstance(value, list):
            try:
                for i, m in enumerate(value):
                    check_turn(m, i)
            except ValueError as e:
                raise ValueError(f"{where} field {self.cfg.field!r}: {e}") from None
        elif not isinstance(value, str):
            raise ValueError(
                f"{where} field {self.cfg.field!r}: expected a string or a list of turns, found {type(value).__name__}"
            )
        return value
