"""The one text -> ids path: tokenizer loading and encoding, used by training, eval, infer and the API.

    encoder = TextEncoder("checkpoints/base")        # folder with spiece.model / tokenizer.json
    encoder.encode(["turn on the radio"])            # [[ids..., eos]]: every row ends with EOS
    ids, mask = encoder.encode_padded(texts, 16)     # [b, n] int32 and bool, n a multiple of 16

The model is trained on ids that end with EOS (T5's convention), so every path adds it.

`layout='decoder'` (the decoder-only LLM, models/speechverse_decoder.py): targets are the answer's
ids without the tokenizer's own specials (no BOS) plus EOS, and `encode_prompts` renders each
instruction with the tokenizer's chat template (the plain template when it has none) and splits it
at the audio placeholder into (prefix, suffix) ids. With `layout='t5'` the prefix is empty and the
suffix is the instruction's ids ending with EOS.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from speechverse_jax import fs
from speechverse_jax.data.batching import pad_rows
from speechverse_jax.models.composed import LAYOUTS

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

    def __init__(self, folder: str = "", tokenizer: Any = None, layout: str = "t5"):
        if not folder and tokenizer is None:
            raise ValueError("data.tokenizer: give a folder holding spiece.model / tokenizer.json")
        if layout not in LAYOUTS:
            raise ValueError(f"model.layout: the text encoder knows {LAYOUTS}, got {layout!r}")
        self.folder, self._tok, self.layout = folder, tokenizer, layout
        self._lock = threading.Lock()
        self._prompts: Dict[str, Tuple[List[int], List[int]]] = {}

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
        """Target ids (T5: also instruction ids), each ending with EOS."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=self.layout == "t5")["input_ids"]
        eos = self.eos_id
        return [list(x) if x and x[-1] == eos else list(x) + [eos] for x in ids]

    def encode_prompts(self, instructions: Sequence[str]) -> List[Tuple[List[int], List[int]]]:
        """(prefix ids, suffix ids) per instruction: the prompt before and after the audio."""
        if self.layout == "t5":
            return [([], ids) for ids in self.encode(instructions)]
        from speechverse_jax.models.speechverse_decoder import prompt_parts

        out = []
        for text in instructions:
            parts = self._prompts.get(text)
            if parts is None:
                parts = prompt_parts(self.tokenizer, text)
                if len(self._prompts) < 65536:
                    self._prompts[text] = parts
            out.append(parts)
        return out

    def encode_prompts_padded(self, instructions: Sequence[str], multiple: int = 1,
                              bucket: bool = False) -> Dict[str, np.ndarray]:
        """The prompt arrays a model takes: `instruction_ids` / `instruction_mask` (T5: the
        instruction; decoder: the prompt after the audio) and, for the decoder layout, `prefix_ids` /
        `prefix_mask` (the prompt before the audio). Lengths are multiples of `multiple`, or with
        `bucket` `batching.bucket_length`'s sizes (fewer shapes to compile)."""
        parts = self.encode_prompts(instructions)
        ids, mask = pad_rows([np.asarray(s, np.int32) for _, s in parts], multiple, np.int32, bucket)
        out = {"instruction_ids": ids, "instruction_mask": mask}
        if self.layout == "decoder":
            out["prefix_ids"], out["prefix_mask"] = pad_rows([np.asarray(p, np.int32) for p, _ in parts], multiple,
                                                             np.int32, bucket)
        return out

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
        state["_prompts"] = {}
        if self.folder:
            state["_tok"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
