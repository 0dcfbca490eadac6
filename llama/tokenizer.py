"""SentencePiece tokenizer for Llama 2 (BPE with byte fallback; bos=1, eos=2, pad=-1)."""

import os
from logging import getLogger
from typing import List, Sequence

from sentencepiece import SentencePieceProcessor

logger = getLogger(__name__)


class Tokenizer:
    """Encodes and decodes text with a SentencePiece model file."""

    def __init__(self, model_path: str):
        """Load ``model_path`` (e.g. ``tokenizer.model`` from the download)."""
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file {model_path} not found (pass tokenizer_path=.../tokenizer.model)")
        self.sp_model = SentencePieceProcessor()
        try:
            loaded = self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a SentencePiece model file: {e}") from None
        if not loaded:
            raise ValueError(f"{model_path} is not a SentencePiece model file")
        logger.info(f"Reloaded SentencePiece model from {model_path}")

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path} defines no BOS/EOS pieces; Llama needs both")
        logger.info(f"#words: {self.n_words} - BOS ID: {self.bos_id} - EOS ID: {self.eos_id}")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of ``s``, with BOS first and/or EOS last when asked for."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: Sequence[int]) -> str:
        """Text of the token ids ``t``."""
        return self.sp_model.decode(list(t))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp_model.id_to_piece(token_id)
