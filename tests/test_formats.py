"""Checkpoint formats: Hugging Face import/export, safe loading, checksums and clear errors."""

import json
import os
import pathlib
import pickle
import runpy
import sys

import pytest
import torch
from helpers import make_checkpoint

from llama import verify as verify_cli
from llama.checkpoint import HFCheckpoint, MetaCheckpoint, expected_keys, global_shape, open_checkpoint
from llama.convert import main as convert_main
from llama.convert import parse_size
from llama.generation import Llama
from llama.model import ModelArgs

GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3, rope_theta=1e6,
           vocab_size=-1, norm_eps=1e-6)
PLAIN = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=-1)


def build(ckpt_dir, tokenizer_path, **kwargs) -> Llama:
    return Llama.build(str(ckpt_dir), str(tokenizer_path), max_seq_len=32, max_batch_size=2, device="cpu", **kwargs)


def logits(llama: Llama, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(3, llama.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return llama.model.forward(tokens, 0)


def convert(*argv) -> None:
    assert convert_main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def meta_gqa(tmp_path_factory, tiny_tokenizer_path):
    """A 2-shard Meta checkpoint with grouped-query attention; the tokenizer sits in its parent, as in Meta's download."""
    root = tmp_path_factory.mktemp("meta_gqa")
    (root / "tokenizer.model").write_bytes(tiny_tokenizer_path.read_bytes())
    make_checkpoint(root / "ckpt", GQA, tiny_tokenizer_path, n_shards=2, std=0.1)
    return root / "ckpt"


@pytest.fixture(scope="module")
def hf_gqa(meta_gqa, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf_gqa"
    convert("--to", "hf", meta_gqa, out)
    return out


# --- Hugging Face import and export -------------------------------------------------------------


def test_meta_to_hf_matches_original_and_transformers(meta_gqa, hf_gqa):
    transformers = pytest.importorskip("transformers")
    assert sorted(p.name for p in hf_gqa.iterdir()) == [
        "checklist.chk", "config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
    ]
    original = logits(build(meta_gqa, meta_gqa.parent / "tokenizer.model"))
    ours = logits(build(hf_gqa, hf_gqa / "tokenizer.model"))
    assert (ours - original).abs().max().item() <= 1e-5

    theirs_model = transformers.LlamaForCausalLM.from_pretrained(hf_gqa, dtype=torch.float32).eval()
    tokens = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = theirs_model(tokens).logits
    assert (theirs - original).abs().max().item() <= 1e-5
    assert verify_cli.main([str(hf_gqa)]) == 0


def test_sharded_hf_with_index_loads(meta_gqa, hf_gqa, tmp_path):
    out = tmp_path / "hf_sharded"
    convert("--to", "hf", meta_gqa, out, "--max-shard-size", "20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    args = open_checkpoint(meta_gqa).args
    assert index["metadata"]["total_size"] == sum(torch.Size(global_shape(k, args)).numel() * 4 for k in expected_keys(args))
    a = logits(build(hf_gqa, hf_gqa / "tokenizer.model"))
    b = logits(build(out, out / "tokenizer.model"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_hf_slices_equal_meta_slices_for_any_world_size(meta_gqa, hf_gqa, world):
    meta, hf_ckpt = open_checkpoint(meta_gqa), open_checkpoint(hf_gqa)
    assert isinstance(meta, MetaCheckpoint) and isinstance(hf_ckpt, HFCheckpoint) and hf_ckpt.n_shards == 1
    for rank in range(world):
        for key in expected_keys(meta.args):
            assert torch.equal(hf_ckpt.tensor(key, rank, world), meta.tensor(key, rank, world)), (key, rank, world)


def test_hf_to_meta_to_hf_is_exact(tmp_path, tiny_tokenizer_path):
    """Start from transformers' own save_pretrained (bfloat16): every tensor and its dtype come back unchanged."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "orig")
    (tmp_path / "orig" / "tokenizer.model").write_bytes(tiny_tokenizer_path.read_bytes())

    convert("--to", "meta", tmp_path / "orig", tmp_path / "meta", "--model-parallel-size", "2")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["rope_theta"] == 5e5 and params["norm_eps"] == 1e-6 and params["n_kv_heads"] == 2
    assert ModelArgs(**params).ffn_hidden_dim == 176
    assert (tmp_path / "meta" / "tokenizer.model").is_file() and verify_cli.main([str(tmp_path / "meta")]) == 0
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64) and shard["norm.weight"].dtype == torch.bfloat16

    convert("--to", "hf", tmp_path / "meta", tmp_path / "back")
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype == torch.bfloat16
        assert torch.equal(before[name], after[name]), name
    config_back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert config_back[key] == config.to_dict()[key]

    # transformers' own directory loads directly, with the same logits as transformers.
    ours = build(tmp_path / "orig", tmp_path / "orig" / "tokenizer.model", dtype="float32")
    reference = model.float()
    tokens = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.model.forward(tokens, 0) - reference(tokens).logits).abs().max().item() <= 1e-5


def test_convert_dtype_and_refuses_to_overwrite(meta_gqa, hf_gqa, tmp_path, capsys):
    convert("--to", "hf", meta_gqa, tmp_path / "half", "--dtype", "float16")
    half = open_checkpoint(tmp_path / "half")
    assert half.dtype() == torch.float16
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "float16"
    assert convert_main(["--to", "hf", str(meta_gqa), str(hf_gqa)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("512") == 512
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("two gigabytes")


# --- safe loading -------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_shard_that_runs_code_is_refused(tmp_path, tiny_tokenizer_path, container):
    make_checkpoint(tmp_path, PLAIN, tiny_tokenizer_path)
    marker = tmp_path / "pwned"
    shard = tmp_path / "consolidated.00.pth"
    payload = {"tok_embeddings.weight": _RunsCode(str(marker))}
    if container == "torch.save":
        torch.save(payload, shard)
    else:
        shard.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="consolidated.00.pth") as e:
        build(tmp_path, tiny_tokenizer_path)
    assert "refused" in str(e.value) or "corrupted" in str(e.value)
    assert not marker.exists()


# --- checksum verification ----------------------------------------------------------------------


@pytest.fixture
def plain(tmp_path, tiny_tokenizer_path):
    make_checkpoint(tmp_path, PLAIN, tiny_tokenizer_path)
    return tmp_path


def test_verify_ok(plain, tiny_tokenizer_path):
    assert build(plain, tiny_tokenizer_path, verify=True).model.params.dim == 64
    assert verify_cli.main([str(plain)]) == 0


def test_verify_mismatch(plain, tiny_tokenizer_path):
    params = plain / "params.json"
    params.write_text(params.read_text() + "\n")  # still valid, different bytes
    with pytest.raises(ValueError, match=r"md5 mismatch: \['params.json'\]"):
        build(plain, tiny_tokenizer_path, verify=True)
    assert verify_cli.main([str(plain)]) == 1
    build(plain, tiny_tokenizer_path)  # without verify it loads


def test_verify_missing_file(plain, tiny_tokenizer_path):
    (plain / "consolidated.00.pth").unlink()
    with pytest.raises(ValueError, match=r"missing: \['consolidated.00.pth'\]"):
        build(plain, tiny_tokenizer_path, verify=True)
    assert verify_cli.main([str(plain)]) == 1


def test_verify_without_checklist(plain, tiny_tokenizer_path):
    (plain / "checklist.chk").unlink()
    with pytest.raises(FileNotFoundError, match="checklist.chk not found"):
        build(plain, tiny_tokenizer_path, verify=True)
    assert verify_cli.main([str(plain)]) == 1


@pytest.mark.filterwarnings("ignore:'llama.verify' found in sys.modules:RuntimeWarning")
def test_verify_cli_exit_codes(plain, capsys, monkeypatch):
    def run(path) -> int:  # `python -m llama.verify PATH`, in this process
        monkeypatch.setattr(sys, "argv", ["llama.verify", str(path)])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("llama.verify", run_name="__main__")
        return e.value.code

    assert run(plain) == 0 and "consolidated.00.pth: OK" in capsys.readouterr().out
    with open(plain / "consolidated.00.pth", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8 if f.read(8) != b"\x00" * 8 else b"\x01" * 8)
    assert run(plain) == 1 and "consolidated.00.pth: FAILED" in capsys.readouterr().out
    assert run(plain / "elsewhere") == 1 and "checklist not found" in capsys.readouterr().out


# --- clear errors -------------------------------------------------------------------------------


def test_error_directory_missing(tmp_path, tiny_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere not found"):
        build(tmp_path / "nowhere", tiny_tokenizer_path)


def test_error_no_shards(tmp_path, tiny_tokenizer_path):
    (tmp_path / "params.json").write_text(json.dumps(PLAIN))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint shards \(consolidated.NN.pth\)"):
        build(tmp_path, tiny_tokenizer_path)


def test_error_not_a_checkpoint_directory(tmp_path, tiny_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="neither params.json .* nor config.json"):
        build(tmp_path, tiny_tokenizer_path)


def test_error_params_missing(plain, tiny_tokenizer_path):
    (plain / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        build(plain, tiny_tokenizer_path)


def test_error_params_not_json(plain, tiny_tokenizer_path):
    (plain / "params.json").write_text("{'dim': 64,")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        build(plain, tiny_tokenizer_path)


def test_error_params_unknown_keys(plain, tiny_tokenizer_path):
    (plain / "params.json").write_text(json.dumps({**PLAIN, "n_experts": 8}))
    with pytest.raises(ValueError, match=r"unknown keys \['n_experts'\]"):
        build(plain, tiny_tokenizer_path)


def test_error_shapes_disagree_with_params(plain, tiny_tokenizer_path):
    (plain / "params.json").write_text(json.dumps({**PLAIN, "multiple_of": 256}))
    found, expected = ModelArgs(**{**PLAIN, "vocab_size": 320}), ModelArgs(**{**PLAIN, "multiple_of": 256, "vocab_size": 320})
    key = "layers.0.feed_forward.w1.weight"
    with pytest.raises(ValueError, match=rf"tensor {key} has shape \({found.ffn_hidden_dim}, 64\), "
                                         rf"expected \({expected.ffn_hidden_dim}, 64\)"):
        build(plain, tiny_tokenizer_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_damaged_shard(plain, tiny_tokenizer_path, damage):
    shard = plain / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(ValueError, match=r"consolidated.00.pth: the file is truncated or corrupted"):
        build(plain, tiny_tokenizer_path)


def test_error_tokenizer_missing(plain):
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.model not found"):
        build(plain, plain / "nope.model")


def test_error_tokenizer_not_sentencepiece(plain):
    (plain / "tokenizer.model").write_text("this is not a SentencePiece model\n")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        build(plain, plain / "tokenizer.model")


@pytest.mark.parametrize("params_vocab", [300, -1])
def test_error_tokenizer_vocab_differs_from_embedding(tmp_path, tiny_tokenizer_path, params_vocab):
    make_checkpoint(tmp_path, {**PLAIN, "vocab_size": 300}, tiny_tokenizer_path)
    (tmp_path / "params.json").write_text(json.dumps({**PLAIN, "vocab_size": params_vocab}))
    with pytest.raises(ValueError, match="embedding has 300 rows but the tokenizer .* has 320 pieces"):
        build(tmp_path, tiny_tokenizer_path)


def test_error_mixed_dtypes_across_shards(tmp_path, tiny_tokenizer_path):
    make_checkpoint(tmp_path, PLAIN, tiny_tokenizer_path, n_shards=2)
    shard = tmp_path / "consolidated.01.pth"
    torch.save({k: v.half() for k, v in torch.load(shard, weights_only=True).items()}, shard)
    with pytest.raises(ValueError, match=r"consolidated.01.pth holds tensors of dtypes \['torch.float16'\]"):
        build(tmp_path, tiny_tokenizer_path)


def test_error_hf_config_without_safetensors(tmp_path, tiny_tokenizer_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json but no .*safetensors"):
        build(tmp_path, tiny_tokenizer_path)


def test_error_hf_shape_disagrees_with_config(hf_gqa, tmp_path, tiny_tokenizer_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes((hf_gqa / "model.safetensors").read_bytes())
    config = json.loads((hf_gqa / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.\d.mlp.\w+_proj.weight \(layers.\d.feed_"
                                         r"forward.w\d.weight\) has shape \(\d+, \d+\), expected .*256.* from config.json"):
        build(out, tiny_tokenizer_path)


def test_error_hf_truncated(hf_gqa, tmp_path, tiny_tokenizer_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text((hf_gqa / "config.json").read_text())
    data = (hf_gqa / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model.safetensors: the file is truncated or corrupted"):
        build(out, tiny_tokenizer_path)
