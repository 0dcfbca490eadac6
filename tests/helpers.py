"""Helpers for tests: tiny checkpoints and a training text."""

import json
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import InMemoryState, random_state_dict, save_checkpoint
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer

TRAINING_TEXT = """\
The river ran quietly past the old mill, where the miller's daughter counted sacks of grain.
Every morning she wrote the numbers 1, 2, 3 and 42 into a small blue notebook.
Travellers stopped at the inn across the bridge; they spoke of mountains, storms and distant cities.
A café in the square sold bread, cheese and apples; naïve tourists paid twice the price.
In winter the water froze, and children skated from the mill to the church and back again.
The blacksmith hammered iron into horseshoes, nails, hinges and the occasional sword.
"Rain tomorrow," said the farmer, looking at the clouds gathering over the western hills.
Numbers, letters and punctuation: 3.14159, 2,718, (brackets), [squares], {braces}; done!
""" * 4


def make_checkpoint(
    directory: Path,
    params: dict,
    tokenizer_path: Path,
    n_shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> ModelArgs:
    """Write a random-weight Meta-format checkpoint (params.json + shards) into ``directory``."""
    vocab = params.get("vocab_size", -1)
    if vocab == -1:
        vocab = Tokenizer(str(tokenizer_path)).n_words
    args = ModelArgs(**{**params, "vocab_size": vocab})
    state = random_state_dict(args, seed=seed, dtype=dtype, std=std)
    save_checkpoint(InMemoryState(args, [state]), Path(directory), n_shards, params)
    return args
