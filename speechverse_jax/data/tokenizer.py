"""The one text -> ids path: tokenizer loading and encoding, used by training, eval, infer and the API.

    encoder = TextEncoder("checkpoints/base")        # folder with spiece.model / tokenizer.json
    encoder.encode(["turn on the radio"])            # [[ids..., eos]]: every row ends with EOS
    ids, mask = encoder.encode_padded(texts, 16)     # [b, n] int32 and bool, n a multiple of 16

The model is trained on ids that end with EOS (T5's convention), so every path adds it.
"""

from __future__ import annotations

import os
import threading
from typing import Any, List, Sequence, Tuple

import numpy as np

from speechverse_jax import fs
from speechverse_jax.data.batching import pad_rows

# transformers resolves its classes lazily on first attribute access; two threads doing that first
# access at once can see a half-initialised module (AttributeError: no attribute 'AutoTokenizer').
_LOAD_LOCK = threading.Lock()


def load_tokenizer(folder: str):
    """The T5 tokenizer carried into a converted folder (spiece.model / tokenizer.json)."""
    if not fs.is_remote(folder) and not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such tokenizer folder (data.tokenizer, or the base checkpoint)")
    with _LOAD_LOCK:
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(folder)
        except Exception:
            try:
                return transformers.T5Tokenizer.from_pretrained(folder, legacy=False)
            except Exception as e:
                raise ValueError(f"{folder}: no usable tokenizer files (spiece.model / tokenizer.json): "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class TextEncoder:
    """A tokenizer from a folder (or given), loaded once per process; pickles as its folder path.

    `encode(texts)` -> list of id lists, each ending with EOS.
    """

    def __init__(self, folder: str = "", tokenizer: Any = None):
        if not folder and tokenizer is None:
            raise ValueError("data.tokenizer: give a folder holding spiece.model / tokenizer.json")
        self.folder, self._tok = folder, tokenizer
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    self._tok = load_tokenizer(self.folder)
        return self._tok

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        eos = self.eos_id
        return [list(x) if x and x[-1] == eos else list(x) + [eos] for x in ids]

    def encode_without_eos(self, text: str) -> List[int]:
        """The ids of `text` alone (a label or slot value inside a longer target)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_padded(self, texts: Sequence[str], multiple: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """-> (ids `[b, n]` int32, mask `[b, n]` bool), n the longest row rounded up to `multiple`."""
        return pad_rows([np.asarray(x, np.int32) for x in self.encode(texts)], multiple, np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        if self.folder:
            state["_tok"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
