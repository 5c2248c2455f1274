"""load_lm / read_lm_config refuse bad checkpoints with one clear line (CheckpointError)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, LMConfig, MiniMindLM, load_lm, read_lm_config
from test_model_lm import minimind_state_dict

CFG = dict(vocab=40, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, hidden=96)


def _minimind_file(tmp_path, sd=None, name="lm.pth"):
    path = tmp_path / name
    torch.save(minimind_state_dict(**CFG, tied=True) if sd is None else sd, path)
    return path


def _model(**change) -> MiniMindLM:
    """The model that fits `CFG`, or one with ``change``d hyper-parameters."""
    dims = dict(vocab_size=40, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=96)
    return MiniMindLM(LMConfig(**(dims | change)))


def _hf_dir(tmp_path, config: dict, tensors: dict | None = None):
    """A Hugging Face-style directory written by hand (names and config keys as transformers
    writes them), so these tests need no transformers."""
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, directory / "model.safetensors")
    return directory


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 40,
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "tie_word_embeddings": True,
}


def _llama_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (40, 32),
        "model.norm.weight": (32,),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.layers.0.post_attention_layernorm.weight": (32,),
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.self_attn.k_proj.weight": (8, 32),
        "model.layers.0.self_attn.v_proj.weight": (8, 32),
        "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.mlp.gate_proj.weight": (96, 32),
        "model.layers.0.mlp.up_proj.weight": (96, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 96),
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _error(fn, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message and "\n" not in message, message
    return message


def test_valid_files_load(tmp_path):
    load_lm(_model(), _minimind_file(tmp_path))
    directory = _hf_dir(tmp_path, LLAMA, _llama_tensors())
    lm = MiniMindLM(read_lm_config(directory))
    load_lm(lm, directory)
    torch.testing.assert_close(lm.output.weight, _llama_tensors()["model.embed_tokens.weight"])


def test_transformers_4_config_layout(tmp_path):
    """Older files keep rope_theta flat, with rope_scaling null, and may omit architectures."""
    config = {k: v for k, v in LLAMA.items() if k not in ("rope_parameters", "architectures")}
    config |= {"rope_theta": 5e5, "rope_scaling": None, "tie_word_embeddings": False}
    cfg = read_lm_config(_hf_dir(tmp_path, config))
    assert cfg.rope_theta == 5e5 and not cfg.tie_embeddings


def test_unknown_architecture(tmp_path):
    config = LLAMA | {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    directory = _hf_dir(tmp_path, config, _llama_tensors())
    for fn in (read_lm_config, lambda d: load_lm(_model(), d)):
        assert "unsupported architecture" in _error(fn, directory)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 8}, "head_dim"),
    ],
)
def test_unsupported_llama_variants(tmp_path, change, expected):
    directory = _hf_dir(tmp_path, LLAMA | change, _llama_tensors())
    assert expected in _error(read_lm_config, directory)


def test_incomplete_or_broken_config(tmp_path):
    config = {k: v for k, v in LLAMA.items() if k != "hidden_size"}
    assert "hidden_size" in _error(read_lm_config, _hf_dir(tmp_path, config))
    (tmp_path / "hf" / "config.json").write_text("{not json")
    assert "config.json" in _error(read_lm_config, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    assert "config.json" in _error(read_lm_config, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    assert "config.json" in _error(read_lm_config, tmp_path / "hf")


def test_missing_keys(tmp_path):
    sd = minimind_state_dict(**CFG, tied=True)
    del sd["layers.1.feed_forward.w2.weight"]
    message = _error(load_lm, _model(), _minimind_file(tmp_path, sd))
    assert "missing" in message and "layers.1.feed_forward.w2.weight" in message

    sd = minimind_state_dict(**CFG, tied=True)
    del sd["layers.0.attention.wk.weight"]  # a tensor the dims are read from
    assert "layers.0.attention.wk.weight" in _error(load_lm, _model(), _minimind_file(tmp_path, sd))

    tensors = _llama_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    directory = _hf_dir(tmp_path, LLAMA, tensors)
    message = _error(load_lm, MiniMindLM(read_lm_config(directory)), directory)
    assert "missing" in message and "layers.0.feed_forward.w3.weight" in message


def test_unexpected_keys(tmp_path):
    sd = minimind_state_dict(**CFG, tied=True) | {"vision_proj.weight": torch.zeros(32, 32)}
    message = _error(load_lm, _model(), _minimind_file(tmp_path, sd))
    assert "unexpected" in message and "vision_proj.weight" in message


def test_wrong_shapes(tmp_path):
    sd = minimind_state_dict(**CFG, tied=True)
    sd["layers.1.attention.wo.weight"] = torch.zeros(32, 16)
    message = _error(load_lm, _model(), _minimind_file(tmp_path, sd))
    assert "layers.1.attention.wo.weight" in message and "(32, 16)" in message

    tensors = _llama_tensors()
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 95)
    directory = _hf_dir(tmp_path, LLAMA, tensors)
    message = _error(load_lm, MiniMindLM(read_lm_config(directory)), directory)
    assert "layers.0.feed_forward.w2.weight" in message


def test_checkpoint_and_model_disagree(tmp_path):
    path = _minimind_file(tmp_path)
    message = _error(load_lm, _model(dim=64), path)
    assert "dim=32" in message and "read_lm_config" in message
    assert "tie_embeddings" in _error(load_lm, _model(tie_embeddings=False), path)


def test_unreadable_files(tmp_path):
    assert "no such file" in _error(read_lm_config, tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert "cannot read" in _error(load_lm, _model(), garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "cannot read" in _error(load_lm, _model(), empty)
    nested = tmp_path / "nested.pth"
    torch.save({"model": minimind_state_dict(**CFG, tied=True), "step": 3}, nested)
    assert "state dict" in _error(load_lm, _model(), nested)
    not_minimind = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, not_minimind)
    assert "MiniMind" in _error(read_lm_config, not_minimind)
    no_weights = _hf_dir(tmp_path, LLAMA)
    assert "safetensors" in _error(load_lm, MiniMindLM(read_lm_config(no_weights)), no_weights)


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a file that would run code on load is an error, not an execution."""
    path = tmp_path / "evil.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": object()}, path)
    assert "cannot read" in _error(load_lm, _model(), path)
