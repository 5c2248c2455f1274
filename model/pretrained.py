"""Load a pretrained language model into the LM part, as Cinego and MiniMind-V start from one.

Two formats:
- a MiniMind checkpoint file (``lm_512.pth``, ``full_sft_640_moe.pth``: a plain state dict with
  MiniMind's parameter names; ``.safetensors`` works too), read with ``weights_only=True``, in
  either naming MiniMind2 used:
  - ``model/model.py`` (until April 2025): ``tok_embeddings``, ``layers.N.attention.wq``,
    ``layers.N.feed_forward.w1`` — this module's own names. It rotates interleaved pairs of
    each head; `model.lm` rotates halves (Llama's ``rotate_half``), so the rows of ``wq`` and
    ``wk`` are permuted per head on load (even rows first, then odd rows) — attention scores are
    unchanged because q and k are permuted alike;
  - ``model/model_minimind.py`` (from April 2025): ``model.embed_tokens``,
    ``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ``lm_head``, which
    already rotates halves: renamed only.
  A mixture-of-experts file (MiniMind's ``use_moe``: ``feed_forward.gate`` / ``mlp.gate``,
  ``experts.{i}.*`` and ``shared_experts.*``) gives an LM with ``moe`` set: the number of
  experts and whether there is a shared one come from its tensors; the experts per token (2),
  the balance-loss weight (0.1) and the renormalisation of the top-k are not stored, so they are
  MiniMind's defaults (a caller may change them: they are not weights). A MiniMind file stores
  no hyper-parameters: dims come from the tensor shapes, the head count from the model being
  loaded into (8 in every MiniMind2 size), rope theta 1e6 and norm eps 1e-5 are MiniMind's.
- a Hugging Face Llama-architecture directory (``config.json`` + ``*.safetensors``, e.g. SmolLM2
  or TinyLlama), with its own dims, heads, KV heads, rope theta, vocabulary and head tying.

Build the model with `read_lm_config` first ("the checkpoint's dims replace the preset's");
any mismatch, unknown architecture, missing key or wrong shape is a one-line `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from model.config import LMConfig, MoEConfig
from model.lm import MiniMindLM

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

MINIMIND_N_HEADS = 8  # every MiniMind2 size; MiniMind files do not record it


class CheckpointError(ValueError):
    """A pretrained LM that cannot be loaded: unknown format or architecture, missing keys,
    wrong shapes, or hyper-parameters that differ from the model's."""


def read_lm_config(path: str | Path, n_heads: int = MINIMIND_N_HEADS) -> LMConfig:
    """The LMConfig of a checkpoint (``n_heads`` is used only for MiniMind files)."""
    path = _existing(path)
    if path.is_dir():
        return _hf_config(path)
    return _minimind_config(_minimind_names(_read_tensors(path), path)[0], n_heads, path)


def load_lm(lm: MiniMindLM, path: str | Path) -> None:
    """Copy the weights of a MiniMind file or Hugging Face Llama directory into ``lm``."""
    path = _existing(path)
    if path.is_dir():
        cfg = _hf_config(path)
        state = _hf_state_dict(path)
    else:
        state, interleaved = _minimind_names(_read_tensors(path), path)
        cfg = _minimind_config(state, lm.cfg.n_heads, path)
        if interleaved:
            state = _halves_from_interleaved_qk(state, cfg)
    _check_same_config(cfg, lm.cfg, path)
    if cfg.tie_embeddings:  # a tied head is stored once, or not at all (Hugging Face)
        state["output.weight"] = state["tok_embeddings.weight"]
    expected = lm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{path}: {len(missing)} missing and {len(unexpected)} unexpected tensors ({problem})"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(expected[name].shape)}"
            )
    lm.load_state_dict(state)
    log.info("loaded pretrained LM %s (%d tensors)", path, len(state))


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return path


def _check_same_config(ckpt: LMConfig, model: LMConfig, path: Path) -> None:
    for f in dataclasses.fields(LMConfig):
        if f.name == "max_seq_len":  # a usage limit, not a weight shape
            continue
        theirs, ours = getattr(ckpt, f.name), getattr(model, f.name)
        if f.name == "moe":  # only the experts are weights; the routing settings are not stored
            theirs, ours = _experts(theirs), _experts(ours)
        if theirs != ours:
            raise CheckpointError(
                f"{path}: checkpoint has {f.name}={theirs} but the model {ours}; "
                "build the model from read_lm_config(path)"
            )


def _experts(moe: MoEConfig | None) -> str:
    if moe is None:
        return "dense"
    return f"{moe.n_experts} experts" + (" + a shared one" if moe.shared_expert else "")


# --- MiniMind files ------------------------------------------------------------------------------


def _read_tensors(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read tensors ({first_line})") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a plain state dict of tensors")
    return state


def _minimind_names(state: StateDict, path: Path) -> tuple[StateDict, bool]:
    """The tensors under this module's names, and whether q/k rotate interleaved pairs (the
    older naming) rather than halves."""
    if "tok_embeddings.weight" in state:
        return state, True
    if "model.embed_tokens.weight" not in state:
        raise CheckpointError(f"{path}: not a MiniMind checkpoint (no tok_embeddings.weight or model.embed_tokens.weight)")
    if any(".mlp.shared_experts.1." in name for name in state):
        raise CheckpointError(f"{path}: more than one shared expert per layer is not supported")
    return {_minimind_name(name): tensor for name, tensor in state.items()}, False


def _minimind_name(name: str) -> str:
    """A ``model_minimind.py`` parameter name -> this module's (a Llama name, or an expert's)."""
    name = name.replace(".mlp.shared_experts.0.", ".mlp.shared_experts.")  # a list of one there
    expert = re.match(r"(.*)\.mlp\.(gate|experts\.\d+|shared_experts)\.(.*)", name)
    if expert is None:
        return _hf_name(name)
    prefix, part, rest = expert.groups()
    for old, new in (("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")):
        rest = rest.replace(old, new)
    return _hf_name(prefix) + f".feed_forward.{part}.{rest}"


def _minimind_config(state: StateDict, n_heads: int, path: Path) -> LMConfig:
    vocab_size, dim = state["tok_embeddings.weight"].shape
    layers = {int(m.group(1)) for name in state if (m := re.match(r"layers\.(\d+)\.", name))}
    gate = state.get("layers.0.feed_forward.gate.weight")
    ffn = "layers.0.feed_forward." + ("w1.weight" if gate is None else "experts.0.w1.weight")
    try:
        kv_width = state["layers.0.attention.wk.weight"].shape[0]
        hidden_dim = state[ffn].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{path}: not a MiniMind checkpoint (no {err.args[0]})") from err
    moe = None
    if gate is not None:
        moe = MoEConfig(n_experts=gate.shape[0], shared_expert="layers.0.feed_forward.shared_experts.w1.weight" in state)
    output = state.get("output.weight")
    try:
        return LMConfig(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=max(layers) + 1,
            n_heads=n_heads,
            n_kv_heads=kv_width // (dim // n_heads),
            hidden_dim=hidden_dim,
            tie_embeddings=output is None or torch.equal(output, state["tok_embeddings.weight"]),
            moe=moe,
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: does not fit {n_heads} heads ({err})") from err


def _halves_from_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder each head's q/k rows (r0, r1, r2, r3, ...) to (r0, r2, ..., r1, r3, ...)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _halves_from_interleaved_qk(state: StateDict, cfg: LMConfig) -> StateDict:
    converted = dict(state)
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            converted[name] = _halves_from_interleaved(tensor, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            converted[name] = _halves_from_interleaved(tensor, cfg.n_kv_heads)
    return converted


# --- Hugging Face Llama directories --------------------------------------------------------------


def _hf_config(directory: Path) -> LMConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(config_file.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
        return _llama_config(hf)
    except KeyError as err:
        raise CheckpointError(f"{config_file}: incomplete Llama config (no {err.args[0]})") from err
    except ValueError as err:  # bad JSON, another architecture, inconsistent dims
        raise CheckpointError(f"{config_file}: {err}") from err


def _llama_config(hf: dict) -> LMConfig:
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ValueError(
            f"unsupported architecture {hf.get('model_type')!r} {architectures}; "
            "only LlamaForCausalLM checkpoints load"
        )
    # transformers >= 5 nests the rotary settings in rope_parameters; older files keep them flat
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    variant = {  # setting: (value in the file, the only value this model implements)
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias")), False),
        "mlp_bias": (bool(hf.get("mlp_bias")), False),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "head_dim": (hf.get("head_dim") or head_dim, head_dim),
    }
    for name, (value, supported) in variant.items():
        if value != supported:
            raise ValueError(f"unsupported Llama variant: {name}={value!r} (only {supported!r} loads)")
    return LMConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _hf_name(name: str) -> str:
    """Hugging Face Llama parameter name -> MiniMind's."""
    renames = (
        ("model.embed_tokens.", "tok_embeddings."),
        ("model.layers.", "layers."),
        ("model.norm.", "norm."),
        ("lm_head.", "output."),
        (".self_attn.q_proj.", ".attention.wq."),
        (".self_attn.k_proj.", ".attention.wk."),
        (".self_attn.v_proj.", ".attention.wv."),
        (".self_attn.o_proj.", ".attention.wo."),
        (".mlp.gate_proj.", ".feed_forward.w1."),
        (".mlp.down_proj.", ".feed_forward.w2."),
        (".mlp.up_proj.", ".feed_forward.w3."),
        (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
    )
    for old, new in renames:
        name = name.replace(old, new)
    return name


def _hf_state_dict(directory: Path) -> StateDict:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights")
    return {_hf_name(name): tensor for file in files for name, tensor in _read_tensors(file).items()}
