"""Llama 2 inference: ``from llama import Llama, Dialog``."""

from .chat_format import B_INST, B_SYS, E_INST, E_SYS, UNSAFE_ERROR, Dialog, Message
from .generation import Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = [
    "Llama",
    "Dialog",
    "Message",
    "ModelArgs",
    "Transformer",
    "Tokenizer",
    "B_INST",
    "E_INST",
    "B_SYS",
    "E_SYS",
    "UNSAFE_ERROR",
]
