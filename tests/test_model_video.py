"""VideoSummary, the placeholder splice and the assembled VideoLM."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import (
    IGNORE,
    SummaryConfig,
    VideoLM,
    VideoLMConfig,
    VideoSummary,
    lm_preset,
    n_targets,
    splice_video_tokens,
    token_loss_sum,
)
from model_helpers import tiny_video_lm


def splice_reference(embeddings, is_placeholder, video_tokens):
    """Per-sample loop: the k-th placeholder of sample b takes video token k of sample b."""
    out = embeddings.clone()
    for b in range(embeddings.shape[0]):
        positions = is_placeholder[b].nonzero().flatten().tolist()
        for k, position in enumerate(positions):
            out[b, position] = video_tokens[b, k]
    return out


def test_splice_matches_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    B, L, N, dim = 4, 30, 5, 8
    embeddings = torch.randn(B, L, dim, generator=g)
    video_tokens = torch.randn(B, N, dim, generator=g)
    is_placeholder = torch.zeros(B, L, dtype=torch.bool)
    is_placeholder[0, 2:7] = True  # early in a full-length row
    is_placeholder[1, 20:25] = True  # late; this row is right-padded after position 26
    # row 2 has no video
    is_placeholder[3, 0:5] = True  # at the very start
    got = splice_video_tokens(embeddings, is_placeholder, video_tokens)
    assert torch.equal(got, splice_reference(embeddings, is_placeholder, video_tokens))
    assert torch.equal(got[2], embeddings[2])


def test_splice_random_batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        B, L, N = 5, 40, 6
        is_placeholder = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            if torch.rand(1, generator=g) < 0.7:
                start = int(torch.randint(0, L - N + 1, (1,), generator=g))
                is_placeholder[b, start : start + N] = True
        embeddings, video_tokens = torch.randn(B, L, 3, generator=g), torch.randn(B, N, 3, generator=g)
        got = splice_video_tokens(embeddings, is_placeholder, video_tokens)
        assert torch.equal(got, splice_reference(embeddings, is_placeholder, video_tokens))


def test_splice_rejects_a_wrong_placeholder_count():
    is_placeholder = torch.zeros(2, 10, dtype=torch.bool)
    is_placeholder[0, :3] = True
    with pytest.raises(ValueError, match="exactly 4 video placeholder"):
        splice_video_tokens(torch.zeros(2, 10, 8), is_placeholder, torch.zeros(2, 4, 8))


def test_splice_keeps_gradients_of_both_inputs():
    embeddings = torch.randn(1, 6, 4, requires_grad=True)
    video_tokens = torch.randn(1, 2, 4, requires_grad=True)
    is_placeholder = torch.tensor([[False, True, True, False, False, False]])
    splice_video_tokens(embeddings, is_placeholder, video_tokens).sum().backward()
    assert torch.equal(video_tokens.grad, torch.ones(1, 2, 4))
    assert torch.equal(embeddings.grad[0, :, 0], torch.tensor([1.0, 0, 0, 1, 1, 1]))


# --- VideoSummary ------------------------------------------------------------------------------


def _frames(B=2, F=6, T=5, D=64, seed=0):
    return torch.randn(B, F, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_full_summary_sees_frame_order(combine):
    torch.manual_seed(0)
    cfg = SummaryConfig(vision_dim=64, n_queries=4, n_layers=2, n_heads=4, n_frames=8, combine=combine)
    summary = VideoSummary(cfg).eval()
    video = _frames()
    with torch.no_grad():
        out = summary(video)
        permuted = summary(video[:, torch.randperm(6, generator=torch.Generator().manual_seed(1))])
    assert out.shape == (2, cfg.n_output_tokens, 64)
    assert (out - permuted).abs().max() > 1e-3


def test_cinego_summary_is_blind_to_frame_order():
    torch.manual_seed(0)
    cfg = SummaryConfig.cinego(vision_dim=64)
    assert (cfg.n_queries, cfg.n_layers, cfg.use_frame_pos, cfg.n_output_tokens) == (197, 1, False, 197)
    summary = VideoSummary(cfg).eval()
    video = _frames()
    with torch.no_grad():
        out = summary(video)
        permuted = summary(video[:, [3, 0, 5, 1, 4, 2]])
    assert out.shape == (2, 197, 64)
    torch.testing.assert_close(out, permuted, rtol=0, atol=1e-5)


def test_token_mlp_is_a_normalised_residual_mlp_on_every_frame_token():
    torch.manual_seed(0)
    cfg = SummaryConfig(vision_dim=64, n_queries=4, n_layers=1, n_heads=4, n_frames=8, token_mlp=True)
    with_mlp = VideoSummary(cfg).eval()
    without = VideoSummary(dataclasses.replace(cfg, token_mlp=False)).eval()
    without.load_state_dict({k: v for k, v in with_mlp.state_dict().items() if not k.startswith("token_mlp.")})
    video = _frames()
    m = with_mlp.token_mlp
    # by hand: LayerNorm, Linear, exact GELU, Linear, plus the input, then a plain standardisation
    x = torch.nn.functional.layer_norm(video, (64,), m.norm.weight, m.norm.bias)
    h = x @ m.mlp[0].weight.T + m.mlp[0].bias
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    y = video + h @ m.mlp[2].weight.T + m.mlp[2].bias
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    expected_tokens = (y - mean) / torch.sqrt(var + 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(with_mlp(video), without(expected_tokens))
        cinego = VideoSummary(dataclasses.replace(SummaryConfig.cinego(64), token_mlp=True)).eval()
        torch.testing.assert_close(cinego(video), cinego(video[:, [3, 0, 5, 1, 4, 2]]), rtol=0, atol=1e-5)


def test_summary_frame_table_is_a_limit():
    summary = VideoSummary(SummaryConfig(vision_dim=64, n_queries=2, n_layers=1, n_heads=4, n_frames=4))
    with pytest.raises(ValueError, match="5 frames"):
        summary(_frames(F=5))


# --- VideoLM -----------------------------------------------------------------------------------


def _tiny_video_lm(video_token_id=3) -> VideoLM:
    return tiny_video_lm(projector="linear", video_token_id=video_token_id)


def test_padding_with_the_placeholder_id_is_not_a_placeholder():
    model = _tiny_video_lm(video_token_id=0)  # the pad id is 0 too
    ids = torch.tensor([[5, 0, 0, 0, 6, 7, 0, 0], [5, 6, 7, 8, 9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    video = torch.randn(2, 2, 4, 32)
    with torch.no_grad():
        embeddings = model.embed(ids, video, mask)
        video_tokens = model.projector(model.summary(video))
    torch.testing.assert_close(embeddings[0, 1:4], video_tokens[0])
    torch.testing.assert_close(embeddings[0, 6:], model.lm.tok_embeddings.weight[[0, 0]])
    torch.testing.assert_close(embeddings[1], model.lm.tok_embeddings(ids[1]))


def test_loss_is_the_shifted_cross_entropy():
    model = _tiny_video_lm()
    ids = torch.tensor([[1, 3, 3, 3, 9, 10, 11], [1, 4, 5, 6, 7, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    labels = torch.tensor([[-100] * 5 + [10, 11], [-100, -100, 5, 6, 7, -100, -100]])
    video = torch.randn(2, 3, 4, 32)
    with torch.no_grad():
        logits, loss = model(ids, mask, video, labels)
        # reference: each sample alone and unpadded, loss summed by hand over labelled targets
        terms = []
        for b, n in enumerate((7, 5)):
            alone, _ = model(ids[b : b + 1, :n], video=video[b : b + 1])
            torch.testing.assert_close(logits[b, :n], alone[0], rtol=0, atol=1e-5)
            log_probs = alone[0].log_softmax(-1)
            terms += [-log_probs[t - 1, labels[b, t]] for t in range(1, n) if labels[b, t] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=0, atol=1e-5)


def test_token_loss_sum_is_the_next_token_cross_entropy_written_out():
    """Against a log-softmax written out in numpy (float64): -log p(label[t] | position t-1),
    summed over labelled targets; IGNORE labels, and a sample with none, add nothing."""
    rng = np.random.default_rng(0)
    B, L, V = 3, 12, 17
    logits = rng.normal(scale=3.0, size=(B, L, V))
    labels = rng.integers(0, V, size=(B, L))
    labels[rng.random((B, L)) < 0.4] = IGNORE
    labels[2] = IGNORE
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = [(b, t) for b in range(B) for t in range(1, L) if labels[b, t] != IGNORE]
    expected = -sum(log_probs[b, t - 1, labels[b, t]] for b, t in targets)

    loss = token_loss_sum(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    assert n_targets(torch.tensor(labels)).item() == len(targets)


def test_the_model_loss_is_the_training_loss():
    from trainer.loss import token_loss_sum as training_loss

    assert training_loss is token_loss_sum
    model = _tiny_video_lm()
    ids = torch.tensor([[1, 4, 5, 6, 7, 8], [1, 9, 10, 11, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7, 8], [IGNORE, 9, 10, 11, IGNORE, IGNORE]])
    with torch.no_grad():
        logits, loss = model(ids, torch.tensor([[1] * 6, [1] * 4 + [0, 0]]), labels=labels)
    torch.testing.assert_close(loss, token_loss_sum(logits, labels) / 7, rtol=0, atol=0)


def test_loss_without_labelled_targets_is_zero_not_nan():
    model = _tiny_video_lm()
    ids = torch.tensor([[1, 4, 5, 6]])
    _, loss = model(ids, labels=torch.tensor([[-100, -100, -100, 6]]))
    assert loss > 0
    _, loss = model(ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()  # and it still has a graph


def test_small_preset_forward_backward_with_a_full_video():
    """8 frames x 197 CLIP ViT-B tokens of width 768, 512 text tokens, on the CPU."""
    torch.manual_seed(0)
    cfg = VideoLMConfig(lm=lm_preset("small"), video_token_id=5)
    model = VideoLM(cfg)
    n = cfg.n_video_tokens
    ids = torch.randint(10, 6400, (1, 512))
    ids[0, 4 : 4 + n] = cfg.video_token_id
    labels = ids.clone()
    labels[0, : 4 + n] = -100
    video = torch.randn(1, 8, 197, 768, dtype=torch.float16)  # the store's dtype
    logits, loss = model(ids, torch.ones_like(ids), video, labels)
    assert logits.shape == (1, 512, 6400) and torch.isfinite(loss)
    loss.backward()
    for part in ("summary", "projector", "lm"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    assert model.summary.frame_pos.grad.abs().sum() > 0  # frame order is trained too
    assert model.summary.temporal.queries.grad.abs().sum() > 0


def test_model_package_imports_nothing_heavy():
    code = (
        "import sys, model\n"
        "heavy = {'pipeline', 'trainer', 'open_clip', 'decord', 'ray', 'zarr', 'transformers'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
