"""The MiniMind LM against independent references: transformers' LlamaForCausalLM and a MiniMind
forward written here the way MiniMind writes it (interleaved complex rotary, repeat_kv)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import LMConfig, MiniMindLM, lm_preset, load_lm, read_lm_config


def _randomize_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights start at 1; make them random so a swapped or skipped norm shows."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


# The sizes of the `hf_llama` checkpoint, as the LMConfig that reading it must give.
HF_LLAMA_SIZES = dict(vocab_size=101, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=176, rope_theta=1e6,
                      norm_eps=1e-5, max_seq_len=256, tie_embeddings=True)

# The name under which transformers' LlamaConfig holds each LMConfig field, written out here (not
# taken from model/, whose reading of these names is what the tests check).
HF_LLAMA_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A small random LlamaForCausalLM (GQA, tied head, rope theta 1e6) saved as safetensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{HF_LLAMA_NAMES[k]: v for k, v in HF_LLAMA_SIZES.items()},
                                      initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(config).eval()
    _randomize_norms(hf, torch.Generator().manual_seed(1))
    directory = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(directory, safe_serialization=True)
    assert list(directory.glob("*.safetensors"))
    return hf, directory


def test_read_lm_config_of_hf_llama(hf_llama):
    _, directory = hf_llama
    cfg = read_lm_config(directory)
    assert cfg == LMConfig(**HF_LLAMA_SIZES)


def test_lm_matches_hf_llama_logits(hf_llama):
    hf, directory = hf_llama
    lm = MiniMindLM(read_lm_config(directory)).eval()
    load_lm(lm, directory)
    assert lm.output.weight is lm.tok_embeddings.weight  # the head stays tied after loading
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(ids)
    assert got.shape == expected.shape == (2, 37, 101)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_lm_matches_hf_llama_on_padded_batches(hf_llama):
    hf, directory = hf_llama
    lm = MiniMindLM(read_lm_config(directory)).eval()
    load_lm(lm, directory)
    ids = torch.randint(1, 101, (3, 20), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([20, 13, 6])
    right = torch.arange(20)[None, :] < lengths[:, None]  # (3, 20), real tokens first
    left = right.flip(1)  # real tokens last
    with torch.no_grad():
        for mask in (right, left):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            expected = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
            got = lm(ids, attention_mask=mask, positions=positions)
            torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-4)
            assert torch.isfinite(got).all()  # padding rows too (no all-masked NaN rows)
        # right padding needs no mask at all: causality hides the padding from real tokens
        torch.testing.assert_close(lm(ids)[right], lm(ids, attention_mask=right)[right])


# --- MiniMind checkpoints --------------------------------------------------------------------------


def minimind_state_dict(vocab, dim, n_layers, n_heads, n_kv_heads, hidden, tied, seed=0):
    """Random weights under MiniMind's parameter names, as ``torch.save(model.state_dict())``
    writes them (a tied head appears under both names)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return scale * torch.randn(*shape, generator=g)

    hd = dim // n_heads
    state = {
        "tok_embeddings.weight": rand(vocab, dim, scale=0.5),
        "norm.weight": 1 + rand(dim, scale=0.5),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": rand(n_heads * hd, dim),
            p + "attention.wk.weight": rand(n_kv_heads * hd, dim),
            p + "attention.wv.weight": rand(n_kv_heads * hd, dim),
            p + "attention.wo.weight": rand(dim, n_heads * hd),
            p + "attention_norm.weight": 1 + rand(dim, scale=0.5),
            p + "ffn_norm.weight": 1 + rand(dim, scale=0.5),
            p + "feed_forward.w1.weight": rand(hidden, dim),
            p + "feed_forward.w2.weight": rand(dim, hidden),
            p + "feed_forward.w3.weight": rand(hidden, dim),
        }
    state["output.weight"] = state["tok_embeddings.weight"] if tied else rand(vocab, dim)
    return state


def minimind_forward(sd, ids, n_heads, n_kv_heads, theta=1e6, eps=1e-5):
    """MiniMind's forward (jingyaogong/minimind model.py), functional, written independently."""

    def rms_norm(x, weight):
        return weight * (x.float() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    def precompute_pos_cis(dim, end):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        t = torch.arange(end)
        freqs = torch.outer(t, freqs).float()
        return torch.polar(torch.ones_like(freqs), freqs)  # complex64 (end, dim/2)

    def apply_rotary_emb(xq, xk, pos_cis):
        xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
        pos_cis = pos_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
        xq_out = torch.view_as_real(xq_ * pos_cis).flatten(3)
        xk_out = torch.view_as_real(xk_ * pos_cis).flatten(3)
        return xq_out.type_as(xq), xk_out.type_as(xk)

    def repeat_kv(x, n_rep):
        bs, slen, n_kv, head_dim = x.shape
        return (
            x[:, :, :, None, :]
            .expand(bs, slen, n_kv, n_rep, head_dim)
            .reshape(bs, slen, n_kv * n_rep, head_dim)
        )

    bsz, seq_len = ids.shape
    dim = sd["tok_embeddings.weight"].shape[1]
    head_dim = dim // n_heads
    pos_cis = precompute_pos_cis(head_dim, seq_len)
    causal = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
    h = F.embedding(ids, sd["tok_embeddings.weight"])
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(n_layers):
        w = {k[len(f"layers.{i}.") :]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        x = rms_norm(h, w["attention_norm.weight"])
        xq = (x @ w["attention.wq.weight"].T).view(bsz, seq_len, n_heads, head_dim)
        xk = (x @ w["attention.wk.weight"].T).view(bsz, seq_len, n_kv_heads, head_dim)
        xv = (x @ w["attention.wv.weight"].T).view(bsz, seq_len, n_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(xq, xk, pos_cis)
        n_rep = n_heads // n_kv_heads
        xq = xq.transpose(1, 2)
        xk, xv = repeat_kv(xk, n_rep).transpose(1, 2), repeat_kv(xv, n_rep).transpose(1, 2)
        scores = (xq @ xk.transpose(-2, -1)) / math.sqrt(head_dim) + causal
        out = F.softmax(scores.float(), dim=-1).type_as(xq) @ xv
        h = h + out.transpose(1, 2).reshape(bsz, seq_len, -1) @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        gate, up = x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w["feed_forward.w2.weight"].T
    return rms_norm(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("tied", [True, False])
def test_lm_matches_minimind_checkpoint(tmp_path, tied):
    sd = minimind_state_dict(
        vocab=89, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden=192, tied=tied
    )
    path = tmp_path / "lm_64.pth"
    torch.save(sd, path)
    cfg = read_lm_config(path)  # MiniMind files do not store the head count: 8, as in MiniMind2
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (64, 2, 8, 2, 192)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (89, tied, 1e6, 1e-5)
    lm = MiniMindLM(cfg).eval()
    load_lm(lm, path)
    ids = torch.randint(0, 89, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = minimind_forward(sd, ids, n_heads=8, n_kv_heads=2)
        got = lm(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_minimind_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    sd = minimind_state_dict(
        vocab=50, dim=32, n_layers=1, n_heads=8, n_kv_heads=4, hidden=96, tied=False
    )
    path = tmp_path / "lm.safetensors"
    save_file(sd, path)
    lm = MiniMindLM(read_lm_config(path)).eval()
    load_lm(lm, path)
    ids = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), minimind_forward(sd, ids, 8, 4), rtol=0, atol=1e-4)


# --- presets -----------------------------------------------------------------------------------


def test_preset_parameter_counts():
    counts = {}
    for name in ("tiny", "small", "base"):
        with torch.device("meta"):  # shapes only: no memory, no init time
            lm = MiniMindLM(lm_preset(name))
        counts[name] = sum(p.numel() for p in lm.parameters())  # the tied head counted once
        print(f"{name}: {counts[name]:,} parameters ({counts[name] / 1e6:.2f}M)")
    small = lm_preset("small")
    assert small.vocab_size == 6400 and small.tie_embeddings
    assert (small.dim, small.n_layers, small.n_heads, small.n_kv_heads) == (512, 8, 8, 2)
    assert 25e6 <= counts["small"] <= 27e6  # MiniMind2-Small: 26M
    base = lm_preset("base")
    assert (base.dim, base.n_layers) == (768, 16)
    assert 100e6 <= counts["base"] <= 108e6  # MiniMind2: 104M
    assert counts["tiny"] < 2e6
    # the independent count: embedding + per layer (q, k, v, o, 3 SwiGLU matrices, 2 norms) + norm
    for name in ("small", "base"):
        c = lm_preset(name)
        kv = c.n_kv_heads * c.head_dim
        layer = 2 * c.dim * c.dim + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim + 2 * c.dim
        assert counts[name] == c.vocab_size * c.dim + c.n_layers * layer + c.dim
