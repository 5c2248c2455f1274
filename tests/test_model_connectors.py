"""The query-free connectors of `model.connectors` (`--summary mean|concat|vchatgpt|pool`): their
token counts, the reduction that defines each one against numpy, what each can tell of frame
order, the config round trip, and one training run per `--summary` kind through the CLI."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import run_train
from model import SummaryConfig, VideoLM, VideoLMConfig, lm_preset
from model.connectors import build_connector
from trainer.config import TrainConfig, model_config
from trainer.errors import TrainerError
from trainer.run import load_run, read_run_config
from trainer.store import StoreInfo
from trainer_helpers import cli_args, make_manifest, make_store, read_metrics, tiny_train_args

# frames, tokens per frame (CLS + a 3 x 3 patch grid: odd, so pooling has partial edge windows), width
F, T, D = 4, 10, 16
POOLING_KINDS = ("mean", "concat", "vchatgpt", "pool")


def frames(B=2, n_frames=F, tokens=T, width=D, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, n_frames, tokens, width)).astype(np.float32)


def connector(kind: str, n_frames=F, tokens=T, width=D, **fields):
    torch.manual_seed(0)
    cfg = SummaryConfig(kind=kind, vision_dim=width, n_frames=n_frames, tokens_per_frame=tokens, **fields)
    return build_connector(cfg).eval()


def run(module, video: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(video)).numpy()


def grid(video: np.ndarray) -> np.ndarray:
    """(B, F, 1 + g*g, D) -> (B, F, g, g, D): the patch tokens, row-major, as a grid."""
    B, n_frames, tokens, width = video.shape
    g = int(round((tokens - 1) ** 0.5))
    return video[:, :, 1:].reshape(B, n_frames, g, g, width)


def window_means(video: np.ndarray, bins: list[tuple[int, int]]) -> np.ndarray:
    """(B, F, n*n, D): the mean of every patch window rows x cols, rows and cols from ``bins``,
    windows in row-major order."""
    patches = grid(video)
    return np.stack([patches[:, :, r0:r1, c0:c1].mean(axis=(2, 3)) for r0, r1 in bins for c0, c1 in bins], axis=2)


# --- token counts ------------------------------------------------------------------------------

# F=8 frames of T=50 tokens (CLS + 7 x 7 patches: ViT-B/32 at 224 px), the README's table
COUNTS_F8_T50 = [
    ("full", {}, 32), ("cinego", {}, 197), ("mean", {}, 50), ("concat", {}, 8), ("concat", {"concat_tokens": 4}, 32),
    ("concat", {"concat_tokens": 9}, 72), ("vchatgpt", {}, 57), ("pool", {}, 128), ("pool", {"pool_stride": 3}, 72),
    ("pool", {"pool_stride": 1}, 392),
]


@pytest.mark.parametrize("kind, fields, expected", COUNTS_F8_T50, ids=[f"{k}{v or ''}" for k, v, _ in COUNTS_F8_T50])
def test_token_counts_for_8_frames_of_50_tokens(kind, fields, expected):
    if kind == "cinego":
        cfg = SummaryConfig.cinego(vision_dim=32)
    else:
        cfg = SummaryConfig(kind=kind, vision_dim=32, n_heads=4, n_frames=8, tokens_per_frame=50, **fields)
    model_cfg = VideoLMConfig(lm=lm_preset("tiny", vocab_size=64), summary=cfg)
    assert cfg.n_output_tokens == model_cfg.n_video_tokens == expected
    video = torch.randn(2, 8, 50, 32)
    with torch.no_grad():
        assert build_connector(model_cfg.summary).eval()(video).shape == (2, expected, 32)
        assert VideoLM(model_cfg).eval().projector(torch.zeros(2, expected, 32)).shape == (2, expected, 128)


# --- what each connector computes, against numpy -----------------------------------------------


def test_mean_is_the_mean_over_frames_of_every_token_position():
    video = frames()
    out = run(connector("mean"), video)
    assert out.shape == (2, T, D)
    np.testing.assert_allclose(out, np.mean(video, axis=1), rtol=1e-6, atol=1e-6)


def test_concat_with_one_token_is_the_cls_tokens():
    video = frames()
    out = run(connector("concat"), video)
    assert out.shape == (2, F, D)
    np.testing.assert_array_equal(out, video[:, :, 0])


@pytest.mark.parametrize("g, m", [(4, 2), (3, 2)], ids=["4x4-to-2x2", "3x3-to-2x2-overlapping"])
def test_concat_with_m_squared_tokens_averages_the_patch_grid(g, m):
    """m x m adaptive average pooling: bin i covers rows floor(i*g/m) .. ceil((i+1)*g/m) - 1 (on
    4 x 4 the 2 x 2 blocks; on 3 x 3 rows 0-1 and 1-2, which overlap), CLS not used."""
    video = frames(tokens=1 + g * g)
    bins = [(i * g // m, -(-(i + 1) * g // m)) for i in range(m)]
    out = run(connector("concat", tokens=1 + g * g, concat_tokens=m * m), video)
    expected = window_means(video, bins)  # (B, F, m*m, D)
    assert out.shape == (2, F * m * m, D)
    np.testing.assert_allclose(out, expected.reshape(2, F * m * m, D), rtol=1e-5, atol=1e-6)
    video[:, :, 0] += 100.0  # the CLS token takes no part
    np.testing.assert_allclose(run(connector("concat", tokens=1 + g * g, concat_tokens=m * m), video), out, atol=1e-6)


def test_vchatgpt_is_temporal_then_spatial_means_of_the_patch_tokens():
    video = frames()
    out = run(connector("vchatgpt"), video)
    patches = video[:, :, 1:]  # Video-ChatGPT's features: the patch tokens, no CLS
    expected = np.concatenate([patches.mean(axis=2), patches.mean(axis=1)], axis=1)  # F temporal, then T-1 spatial
    assert out.shape == (2, F + T - 1, D)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    video[:, :, 0] += 100.0
    np.testing.assert_allclose(run(connector("vchatgpt"), video), out, atol=1e-6)


@pytest.mark.parametrize("g, s, bins", [
    (4, 2, [(0, 2), (2, 4)]),
    (3, 2, [(0, 2), (2, 3)]),  # the edge window covers one row / column and averages only those
    (3, 1, [(0, 1), (1, 2), (2, 3)]),  # stride 1: every patch token as it is
], ids=["4x4-s2", "3x3-s2-edge", "3x3-s1"])
def test_pool_is_the_block_means_of_each_frame_plus_its_frame_embedding(g, s, bins):
    video = frames(tokens=1 + g * g)
    pool = connector("pool", tokens=1 + g * g, pool_stride=s)
    out = run(pool, video)
    n = len(bins)
    assert out.shape == (2, F * n * n, D) == (2, pool.cfg.n_output_tokens, D)
    frame_pos = pool.frame_pos.detach().numpy()  # (F, D)
    expected = window_means(video, bins) + frame_pos[None, :, None, :]  # (B, F, n*n, D)
    np.testing.assert_allclose(out, expected.reshape(2, -1, D), rtol=1e-5, atol=1e-5)
    plain = run(connector("pool", tokens=1 + g * g, pool_stride=s, use_frame_pos=False), video)
    np.testing.assert_allclose(plain, window_means(video, bins).reshape(2, -1, D), rtol=1e-5, atol=1e-6)


# --- frame order -------------------------------------------------------------------------------

PERM = [2, 0, 3, 1]


def blocks(out: np.ndarray, n_frames=F) -> np.ndarray:
    """(B, F*n, D) -> (B, F, n, D): the tokens of each frame."""
    return out.reshape(out.shape[0], n_frames, -1, out.shape[-1])


def test_mean_is_blind_to_frame_order():
    video, mean = frames(), connector("mean")
    np.testing.assert_allclose(run(mean, video[:, PERM]), run(mean, video), rtol=1e-6, atol=1e-6)


def test_vchatgpt_temporal_tokens_follow_the_frames_and_its_spatial_tokens_are_blind():
    """Reordering the frames reorders the F temporal tokens the same way and leaves the T-1 spatial
    tokens as they were: the connector has no frame positions; the LM sees the order only through
    where the temporal tokens sit in the prompt."""
    video, vchat = frames(), connector("vchatgpt")
    out, permuted = run(vchat, video), run(vchat, video[:, PERM])
    np.testing.assert_allclose(permuted[:, :F], out[:, PERM], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(permuted[:, F:], out[:, F:], rtol=1e-6, atol=1e-6)
    assert np.abs(permuted - out).max() > 1e-2  # as a token sequence it does change


@pytest.mark.parametrize("k", [1, 4])
def test_concat_blocks_follow_the_frames(k):
    video, concat = frames(), connector("concat", concat_tokens=k)
    out, permuted = run(concat, video), run(concat, video[:, PERM])
    np.testing.assert_allclose(blocks(permuted), blocks(out)[:, PERM], rtol=1e-6, atol=1e-6)


def test_pool_frame_embedding_ties_tokens_to_their_frame_slot():
    """Without the frame table, reordering the frames only reorders pool's per-frame blocks; with it,
    the output is not a reordering of the original one: frame f's slot carries embedding f."""
    video, pool = frames(), connector("pool")
    out, permuted = run(pool, video), run(pool, video[:, PERM])
    assert np.abs(blocks(permuted) - blocks(out)[:, PERM]).max() > 1e-1
    pos = pool.frame_pos.detach().numpy()[None, :, None, :]
    np.testing.assert_allclose(blocks(permuted) - pos, (blocks(out) - pos)[:, PERM], rtol=1e-5, atol=1e-5)
    plain = connector("pool", use_frame_pos=False)
    np.testing.assert_allclose(blocks(run(plain, video[:, PERM])), blocks(run(plain, video))[:, PERM], atol=1e-6)


def test_full_summary_output_changes_with_frame_order():
    torch.manual_seed(0)
    full = build_connector(SummaryConfig(vision_dim=D, n_queries=3, n_layers=1, n_heads=4, n_frames=F)).eval()
    video = frames()
    assert np.abs(run(full, video[:, PERM]) - run(full, video)).max() > 1e-3


@pytest.mark.parametrize("kind", POOLING_KINDS)
def test_a_video_of_another_shape_is_refused(kind):
    module = connector(kind, concat_tokens=4) if kind == "concat" else connector(kind)
    with pytest.raises(ValueError, match="9 tokens"):
        module(torch.zeros(1, F, 9, D))
    if kind != "mean":  # mean's count does not depend on F
        with pytest.raises(ValueError, match="5 frames"):
            module(torch.zeros(1, 5, T, D))


# --- configs -----------------------------------------------------------------------------------


def pooling_config(kind: str, **fields) -> VideoLMConfig:
    summary = SummaryConfig(kind=kind, vision_dim=D, n_frames=F, tokens_per_frame=T, **fields)
    return VideoLMConfig(lm=lm_preset("tiny", vocab_size=64), summary=summary, video_token_id=3)


@pytest.mark.parametrize("kind, fields", [("mean", {}), ("concat", {"concat_tokens": 4}), ("vchatgpt", {}),
                                          ("pool", {"pool_stride": 1})])
def test_config_round_trips_to_the_same_model(kind, fields):
    cfg = pooling_config(kind, **fields)
    again = VideoLMConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and again.n_video_tokens == cfg.n_video_tokens
    torch.manual_seed(0)
    model = VideoLM(cfg).eval()
    rebuilt = VideoLM(again).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same parameters
    ids = torch.full((1, cfg.n_video_tokens + 4), 3)
    ids[0, :2], ids[0, -2:] = torch.tensor([5, 6]), torch.tensor([7, 8])
    video = torch.from_numpy(frames(B=1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, video=video)[0], model(ids, video=video)[0], rtol=0, atol=0)


def test_a_config_from_before_the_connectors_loads_as_before():
    """config.json of a run made before the pooling kinds: no tokens_per_frame, concat_tokens or
    pool_stride in its summary. It loads to the model it was, with the same token count."""
    old_summary = {"kind": "full", "vision_dim": 64, "n_queries": 5, "n_layers": 1, "n_heads": 4, "n_frames": 8,
                   "use_frame_pos": True, "n_tokens": 577, "use_token_pos": True, "pos_std": 1.0, "combine": "concat",
                   "mlp_ratio": 4.0, "token_mlp": False}
    cfg = VideoLMConfig.from_dict({"lm": dataclasses.asdict(lm_preset("tiny", vocab_size=64)), "summary": old_summary,
                                   "projector": {"kind": "linear"}, "video_token_id": 3})
    assert cfg.summary == SummaryConfig(**old_summary) and cfg.n_video_tokens == 10
    names = {name for name, _ in VideoLM(cfg).summary.named_parameters()}
    assert {"frame_pos", "token_pos", "spatial.queries", "temporal.queries"} <= names


@pytest.mark.parametrize("fields, match", [
    ({"kind": "concat", "concat_tokens": 3}, "concat_tokens must be 1"),
    ({"kind": "concat", "concat_tokens": 16}, "too large for the 3 x 3"),
    ({"kind": "pool", "pool_stride": 4}, "too large for the 3 x 3"),
    ({"kind": "pool", "pool_stride": 0}, "at least 1"),
    ({"kind": "pool", "tokens_per_frame": 11}, "square patch grid"),
    ({"kind": "mean", "tokens_per_frame": None}, "needs tokens_per_frame"),
    ({"kind": "lstm"}, "kind must be one of"),
])
def test_bad_connector_configs_are_one_line_errors(fields, match):
    with pytest.raises(ValueError, match=match) as info:
        SummaryConfig(**{"vision_dim": D, "n_frames": F, "tokens_per_frame": T, **fields})
    assert "\n" not in str(info.value)


def test_the_video_lm_splices_the_projected_connector_tokens_and_trains_them():
    for kind in POOLING_KINDS:
        torch.manual_seed(0)
        model = VideoLM(pooling_config(kind))
        n = model.cfg.n_video_tokens
        ids = torch.tensor([[5, *[3] * n, 6, 7, 8]])
        video = torch.from_numpy(frames(B=1))
        embeddings = model.embed(ids, video)
        torch.testing.assert_close(embeddings[0, 1 : 1 + n], model.projector(model.summary(video))[0])
        logits, loss = model(ids, video=video, labels=ids)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters()), kind
        if kind == "pool":
            assert model.summary.frame_pos.grad.abs().sum() > 0


# --- the trainer -------------------------------------------------------------------------------


def _store(frames=3, tokens=T) -> StoreInfo:
    return StoreInfo(path="store.zarr", attrs={}, status=np.ones(4, dtype=np.uint8), shape=(4, frames, tokens, 32))


def _model_config(store=None, source=None, **flags):
    cfg = TrainConfig(manifest="m", store="s", out="o", preset="tiny", max_len=128, **flags)
    return model_config(cfg, SimpleNamespace(vocab_size=320, video_id=3), store or _store(), source)


def test_model_config_takes_the_store_shape_and_refuses_what_does_not_apply():
    cfg = _model_config(summary="pool", pool_stride=1)
    assert (cfg.summary.kind, cfg.summary.n_frames, cfg.summary.tokens_per_frame, cfg.n_video_tokens) == ("pool", 3, 10, 27)
    assert _model_config(summary="concat", concat_tokens=4).n_video_tokens == 12
    assert _model_config(summary="full").summary.tokens_per_frame is None  # the VideoSummary's config as before
    for flags, match in [
        ({"summary": "mean", "queries": 4}, "--summary mean does not take --queries"),
        ({"summary": "pool", "concat_tokens": 4}, "does not take --concat-tokens"),
        ({"summary": "full", "pool_stride": 2}, "does not take --pool-stride"),
        ({"summary": "concat", "concat_tokens": 2}, "concat_tokens must be 1"),
        ({"summary": "vchatgpt", "train_parts": ("summary",)}, "has no weights"),
        ({"summary": "rnn"}, "--summary must be one of"),
    ]:
        with pytest.raises(TrainerError, match=match):
            _model_config(**flags)
    with pytest.raises(TrainerError, match="square patch grid"):
        _model_config(store=_store(tokens=11), summary="pool")
    # a run started from another on a store of another shape
    source = {"model": dataclasses.asdict(_model_config(summary="mean"))}
    assert _model_config(source=source).summary.kind == "mean"
    with pytest.raises(TrainerError, match="built for 3 frames of 10 tokens; the store has 3 of 17"):
        _model_config(store=_store(tokens=17), source=source)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("connectors")
    manifest = make_manifest(root, n_videos=8)
    store = make_store(root / "store.zarr", manifest, frames=3, tokens=T, width=32)
    return {"root": root, "manifest": manifest, "store": store}


# --summary value, its flags, the video tokens per sample (3 frames of 10 tokens: CLS + 3 x 3)
TRAINED = [("full", {}, 4), ("cinego", {}, 4), ("mean", {}, 10), ("concat", {}, 3), ("concat", {"concat_tokens": 4}, 12),
           ("vchatgpt", {}, 12), ("pool", {}, 12), ("pool", {"pool_stride": 3}, 3)]


@pytest.mark.parametrize("kind, flags, n_video", TRAINED, ids=[f"{k}{v or ''}" for k, v, _ in TRAINED])
def test_the_trainer_trains_every_summary_kind(corpus, kind, flags, n_video, capsys):
    out = corpus["root"] / f"run-{kind}-{'-'.join(map(str, flags.values()))}"
    args = tiny_train_args(corpus["manifest"], corpus["store"], out, steps=2, summary=kind, **flags)
    if kind not in ("full", "cinego"):  # the query flags are the VideoSummary's
        args.update(queries=None, summary_layers=None, summary_heads=None)
    assert run_train.main(["train", *cli_args(**args)]) == 0, capsys.readouterr().err
    loaded = load_run(out, torch.device("cpu"))
    assert loaded.model.cfg.summary.kind == kind and loaded.model.cfg.n_video_tokens == n_video
    assert loaded.model.cfg == VideoLMConfig.from_dict(read_run_config(out)["model"])
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
