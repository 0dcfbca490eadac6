"""Tokenizer: golden ids of the real Llama 2 tokenizer, byte fallback of the tiny one, errors."""

import pytest

from llama.tokenizer import Tokenizer

# Published ids (no BOS/EOS) of Meta's Llama 2 tokenizer.
GOLDEN = {
    "Hello world": [15043, 3186],
    " Hello": [29871, 15043],
    "[INST]": [518, 25580, 29962],
    "[/INST]": [518, 29914, 25580, 29962],
}

ROUND_TRIP = [
    "Hello world",
    "naïve café",
    "日本語のテキスト",
    "😀 emoji and 🦙",
    "tabs\tand\nnewlines\n\n",
    "  two leading spaces",
    "[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST]",
    "3.14159 and 42",
]


@pytest.fixture(scope="module")
def real(real_tokenizer_path) -> Tokenizer:
    return Tokenizer(str(real_tokenizer_path))


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer(str(tiny_tokenizer_path))


# --- the real Llama 2 tokenizer ----------------------------------------------------------


def test_real_special_ids_and_size(real):
    assert real.n_words == 32000
    assert (real.bos_id, real.eos_id, real.pad_id) == (1, 2, -1)
    assert [real.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    # Byte-fallback pieces <0x00>..<0xFF> at ids 3..258.
    assert real.id_to_piece(3) == "<0x00>" and real.id_to_piece(258) == "<0xFF>"


@pytest.mark.parametrize("text", sorted(GOLDEN))
def test_real_golden_ids(real, text):
    assert real.encode(text, bos=False, eos=False) == GOLDEN[text]
    assert real.decode(GOLDEN[text]) == text


def test_real_pieces_look_right(real):
    pieces = [real.id_to_piece(i) for i in GOLDEN["[/INST]"]]
    assert pieces == ["▁[", "/", "INST", "]"]
    assert [real.id_to_piece(i) for i in GOLDEN["Hello world"]] == ["▁Hello", "▁world"]


def test_real_bos_eos_flags(real):
    ids = GOLDEN["Hello world"]
    assert real.encode("Hello world", bos=True, eos=False) == [1] + ids
    assert real.encode("Hello world", bos=False, eos=True) == ids + [2]
    assert real.encode("Hello world", bos=True, eos=True) == [1] + ids + [2]
    assert real.encode("", bos=False, eos=False) == []
    assert real.encode("", bos=True, eos=True) == [1, 2]


def test_real_decode(real):
    assert real.decode([15043, 3186]) == "Hello world"
    assert real.decode([1, 15043, 3186, 2]) == "Hello world"  # BOS/EOS decode to nothing
    assert real.decode([]) == ""
    # Byte pieces are reassembled into UTF-8 characters.
    assert real.decode([29871, 243, 162, 155, 131]) == "😀"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_real_round_trip(real, text):
    assert real.decode(real.encode(text, bos=True, eos=True)) == text


def test_real_emoji_uses_byte_pieces(real):
    ids = real.encode("😀", bos=False, eos=False)
    assert ids == [29871] + [b + 3 for b in "😀".encode("utf-8")]
    assert 0 not in ids  # never <unk>


# --- the tiny tokenizer of the tests ---------------------------------------------------


def test_tiny_special_ids(tiny):
    assert tiny.n_words == 320
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id) == (1, 2, -1)
    assert tiny.id_to_piece(3) == "<0x00>" and tiny.id_to_piece(258) == "<0xFF>"


@pytest.mark.parametrize("text", ["日本語", "😀🦙", "naïve café", "mixed 🦙 text, 世界!", "\x00nul", "€"])
def test_tiny_byte_fallback_round_trip(tiny, text):
    ids = tiny.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert 0 not in ids  # byte fallback: no <unk>
    assert tiny.decode(ids) == text


def test_tiny_emoji_and_cjk_are_utf8_bytes(tiny):
    for char in ["😀", "語"]:
        ids = tiny.encode(char, bos=False, eos=False)
        byte_ids = [b + 3 for b in char.encode("utf-8")]
        assert ids[-len(byte_ids):] == byte_ids
        assert [tiny.id_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in char.encode("utf-8")]
        # A character split over several tokens decodes whole only when all its bytes are there.
        assert tiny.decode(byte_ids) == char


# --- errors -----------------------------------------------------------------------------


def test_missing_tokenizer_names_path(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(str(path))
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(path)  # a Path works too
    assert str(path) in str(info.value)


def test_not_a_sentencepiece_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("this is not a model")
    with pytest.raises(ValueError) as info:
        Tokenizer(str(path))
    assert str(path) in str(info.value) and "SentencePiece" in str(info.value)


def test_encode_rejects_non_str(tiny):
    with pytest.raises(TypeError, match="str"):
        tiny.encode([1, 2], bos=True, eos=False)
