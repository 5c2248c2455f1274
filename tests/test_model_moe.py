"""The MiniMind mixture-of-experts LM (`--moe`) against independent references.

- Logits: transformers' Qwen2-MoE, whose routing is MiniMind's (softmax over the experts, top-k,
  the top-k probabilities renormalised or not), with its shared expert's sigmoid gate pinned to
  one half (gate weights zero) and that expert's output projection doubled, so that it adds the
  shared expert unweighted as MiniMind does. Its weights reach our LM through MiniMind checkpoint
  files of both namings, written here (`--init-lm`).
- The feed-forward: a per-token loop in float64 over the experts, written from MiniMind's
  ``MoEGate`` / ``MOEFeedForward``.
- The balance loss: MiniMind's sequence-level formula (``seq_aux=True``) per sequence in numpy.
- The trainer: the update minimises next-token loss + the balance loss as MiniMind adds it;
  metrics.jsonl logs ``aux_loss``; resume stays exact; ``eval`` reports the expert load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_train
from manifests.manifest import load_manifest
from model import (CheckpointError, LMConfig, MiniMindLM, MoEConfig, ProjectorConfig, SummaryConfig, VideoLM, VideoLMConfig,
                   load_lm, read_lm_config)
from trainer.batching import Batch
from trainer.config import TrainConfig, model_config
from trainer.distributed import Dist
from trainer.errors import TrainerError
from trainer.eval_table import accuracy_table
from trainer.evaluate import EvalConfig, evaluate
from trainer.examples import build_examples
from trainer.features import make_features
from trainer.run import load_run, read_run_config
from trainer.store import open_store
from trainer.optim import set_trainable
from trainer.train import train, train_step
from trainer_helpers import (REPO, TORCHRUN, cli_args, make_manifest, make_store, read_metrics, subprocess_env,
                             tiny_train_args)

# --- a Qwen2-MoE reference and MiniMind files made from it ----------------------------------------

SIZES = dict(vocab=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden=96)  # 8 heads: MiniMind files assume it


def qwen2_moe(n_experts: int, k: int, shared: bool, norm: bool, seed: int = 0):
    """A random Qwen2MoeForCausalLM routed as MiniMind routes, decisive gates and random norms."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen2MoeConfig(
        vocab_size=SIZES["vocab"], hidden_size=SIZES["dim"], num_hidden_layers=SIZES["n_layers"],
        num_attention_heads=SIZES["n_heads"], num_key_value_heads=SIZES["n_kv_heads"], intermediate_size=SIZES["hidden"],
        moe_intermediate_size=SIZES["hidden"], shared_expert_intermediate_size=SIZES["hidden"], num_experts=n_experts,
        num_experts_per_tok=k, norm_topk_prob=norm and k > 1,  # MiniMind renormalises only when k > 1
        qkv_bias=False, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.1,
        max_position_embeddings=256, experts_implementation="eager",  # its plain loop over the experts
    )
    hf = transformers.Qwen2MoeForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):  # far from ties, so both sides pick the same experts
                param.copy_(torch.randn(param.shape, generator=g))
            elif name.endswith("shared_expert_gate.weight"):
                param.zero_()  # sigmoid(0) = 1/2 on every token
            elif name.endswith("shared_expert.down_proj.weight") and not shared:
                param.zero_()  # no shared expert
    return hf


def minimind_file(hf, path: Path, naming: str, shared: bool) -> Path:
    """Qwen2-MoE's weights saved as MiniMind would save its MoE model (``torch.save`` of its
    state dict, the tied head under both names), in the naming of ``model/model.py`` (rotary on
    interleaved pairs: q/k rows reordered to them) or ``model/model_minimind.py`` (halves)."""
    hd = SIZES["dim"] // SIZES["n_heads"]
    interleaved_rows = [j // 2 + (j % 2) * (hd // 2) for j in range(hd)]  # row 2i <- i, row 2i+1 <- i + hd/2

    def interleave(w, n_heads):
        return torch.cat([w[h * hd : (h + 1) * hd][interleaved_rows] for h in range(n_heads)])

    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    out = {}
    old = naming == "model.py"
    out["tok_embeddings.weight" if old else "model.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    out["norm.weight" if old else "model.norm.weight"] = sd["model.norm.weight"]
    for i in range(SIZES["n_layers"]):
        h = f"model.layers.{i}."
        p = f"layers.{i}." if old else h
        attn = {"q": sd[h + "self_attn.q_proj.weight"], "k": sd[h + "self_attn.k_proj.weight"],
                "v": sd[h + "self_attn.v_proj.weight"], "o": sd[h + "self_attn.o_proj.weight"]}
        if old:
            attn["q"], attn["k"] = interleave(attn["q"], SIZES["n_heads"]), interleave(attn["k"], SIZES["n_kv_heads"])
        for x, w in attn.items():
            out[p + (f"attention.w{x}.weight" if old else f"self_attn.{x}_proj.weight")] = w
        out[p + ("attention_norm.weight" if old else "input_layernorm.weight")] = sd[h + "input_layernorm.weight"]
        out[p + ("ffn_norm.weight" if old else "post_attention_layernorm.weight")] = sd[h + "post_attention_layernorm.weight"]
        ffn = p + ("feed_forward." if old else "mlp.")
        names = ("w1", "w2", "w3") if old else ("gate_proj", "down_proj", "up_proj")
        out[ffn + "gate.weight"] = sd[h + "mlp.gate.weight"]
        for e, (gate_up, down) in enumerate(zip(sd[h + "mlp.experts.gate_up_proj"], sd[h + "mlp.experts.down_proj"])):
            gate, up = gate_up.chunk(2)
            for name, w in zip(names, (gate, down, up)):
                out[f"{ffn}experts.{e}.{name}.weight"] = w
        if shared:
            s = h + "mlp.shared_expert."
            ws = (sd[s + "gate_proj.weight"], sd[s + "down_proj.weight"] / 2, sd[s + "up_proj.weight"])  # the 1/2 gate
            for name, w in zip(names, ws):
                out[f"{ffn}shared_experts.{'' if old else '0.'}{name}.weight"] = w
    out["output.weight" if old else "lm_head.weight"] = out["tok_embeddings.weight" if old else "model.embed_tokens.weight"]
    torch.save(out, path)
    return path


ROUTINGS = [  # naming, experts, k, shared, renormalised
    ("model.py", 4, 2, True, True),  # MiniMind2-MoE's
    ("model_minimind.py", 4, 2, True, True),
    ("model_minimind.py", 3, 1, False, True),
    ("model.py", 5, 3, True, False),
]


@pytest.mark.parametrize("naming, n_experts, k, shared, norm", ROUTINGS)
def test_minimind_moe_file_loads_and_matches_qwen2_moe(tmp_path, naming, n_experts, k, shared, norm):
    hf = qwen2_moe(n_experts, k, shared, norm)
    path = minimind_file(hf, tmp_path / "full_sft_64_moe.pth", naming, shared)
    cfg = read_lm_config(path)
    # the file holds the experts; the routing settings are MiniMind's defaults until changed
    assert cfg == LMConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=96,
                           moe=MoEConfig(n_experts=n_experts, shared_expert=shared))
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, experts_per_token=k, norm_topk_prob=norm))
    lm = MiniMindLM(cfg).eval()
    load_lm(lm, path)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    lm.train()  # the same routing and mixing while training
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), expected, rtol=0, atol=1e-4)


def test_moe_files_that_do_not_fit_are_refused(tmp_path):
    path = minimind_file(qwen2_moe(4, 2, True, True), tmp_path / "moe.pth", "model_minimind.py", shared=True)
    dense = MiniMindLM(LMConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=96))
    with pytest.raises(CheckpointError, match="moe=4 experts \\+ a shared one but the model dense"):
        load_lm(dense, path)
    other = dataclasses.replace(dense.cfg, moe=MoEConfig(n_experts=4, shared_expert=False))
    with pytest.raises(CheckpointError, match="moe=4 experts \\+ a shared one but the model 4 experts"):
        load_lm(MiniMindLM(other), path)
    sd = torch.load(path, weights_only=True)
    sd |= {k.replace("shared_experts.0.", "shared_experts.1."): v for k, v in sd.items() if "shared_experts.0." in k}
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="more than one shared expert"):
        read_lm_config(path)


# --- the feed-forward, routing and balance loss ----------------------------------------------------


def tiny_moe_lm(n_experts=4, k=2, shared=True, norm=True, alpha=0.1, seed=0) -> MiniMindLM:
    """A random MoE LM with gates far from ties and non-trivial norms."""
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                   moe=MoEConfig(n_experts=n_experts, experts_per_token=k, shared_expert=shared, norm_topk_prob=norm,
                                 aux_loss_alpha=alpha))
    lm = MiniMindLM(cfg)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(std=0.5)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return lm


def swiglu(w1, w2, w3, x):
    return w2 @ (x @ w1.T / (1 + np.exp(-(x @ w1.T))) * (x @ w3.T))


def reference_moe(sd: dict[str, np.ndarray], x: np.ndarray, k: int, norm: bool) -> np.ndarray:
    """MiniMind's MoE feed-forward, token by token, in float64."""
    n_experts = sd["gate.weight"].shape[0]
    out = np.zeros_like(x)
    for t, token in enumerate(x):
        logits = sd["gate.weight"] @ token
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = sorted(range(n_experts), key=lambda e: -probs[e])[:k]
        weights = probs[top] / (probs[top].sum() if k > 1 and norm else 1.0)
        for e, w in zip(top, weights):
            out[t] += w * swiglu(*(sd[f"experts.{e}.w{j}.weight"] for j in (1, 2, 3)), token)
        if "shared_experts.w1.weight" in sd:
            out[t] += swiglu(*(sd[f"shared_experts.w{j}.weight"] for j in (1, 2, 3)), token)
    return out


@pytest.mark.parametrize("n_experts, k, shared, norm", [(4, 2, True, True), (3, 1, False, True), (5, 3, True, False)])
def test_moe_feed_forward_matches_a_token_loop(n_experts, k, shared, norm):
    ffn = tiny_moe_lm(n_experts, k, shared, norm).layers[0].feed_forward
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    sd = {name: t.double().numpy() for name, t in ffn.state_dict().items()}
    expected = reference_moe(sd, x.reshape(-1, 32).double().numpy(), k, norm).reshape(3, 9, 32)
    for mode in (ffn.eval, ffn.train):
        mode()
        np.testing.assert_allclose(ffn(x).detach().double().numpy(), expected, rtol=0, atol=1e-5)


def test_routing_sends_each_token_to_k_experts_with_renormalised_weights():
    lm = tiny_moe_lm(n_experts=5, k=3)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(11)[None, :] < torch.tensor([[11], [6]])
    lm(ids)
    for layer in lm.moe_layers():
        scores, chosen = layer.routing.scores, layer.routing.chosen
        assert chosen.shape == (2, 11, 3) and scores.shape == (2, 11, 5)
        torch.testing.assert_close(scores.sum(-1), torch.ones(2, 11))
        for b in range(2):
            for t in range(11):
                picked = chosen[b, t].tolist()
                assert len(set(picked)) == 3  # k distinct experts
                others = [e for e in range(5) if e not in picked]
                assert scores[b, t, picked].min() > scores[b, t, others].max()  # the k highest
        # expert_counts: the choices of the real positions only
        expected = np.zeros(5, dtype=np.int64)
        for b, t in zip(*np.nonzero(mask.numpy())):
            for e in chosen[b, t].tolist():
                expected[e] += 1
        assert layer.expert_counts(mask).tolist() == expected.tolist() and expected.sum() == 3 * 17
    assert lm.expert_counts(mask).shape == (2, 5)

    x = torch.randn(7, 32)
    for k, norm in ((3, True), (3, False), (1, True)):
        ffn = tiny_moe_lm(n_experts=5, k=k, norm=norm).layers[0].feed_forward
        scores, chosen, weights = ffn.route(x)
        raw = scores.gather(1, chosen)
        if k > 1 and norm:
            torch.testing.assert_close(weights.sum(-1), torch.ones(7))
            torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))
        else:  # MiniMind keeps the raw probabilities (one expert: its probability, not 1)
            torch.testing.assert_close(weights, raw)
            assert (weights.sum(-1) < 1).all()


def minimind_aux_loss(x: np.ndarray, gate: np.ndarray, k: int, alpha: float) -> float:
    """MiniMind's MoEGate aux loss (seq_aux=True) of one sequence x (L, dim), written out."""
    L, n_experts = len(x), gate.shape[0]
    logits = x @ gate.T
    scores = np.exp(logits - logits.max(1, keepdims=True))
    scores /= scores.sum(1, keepdims=True)
    ce = np.zeros(n_experts)
    for t in range(L):
        for e in np.argsort(-scores[t], kind="stable")[:k]:
            ce[e] += 1
    ce /= L * k / n_experts
    return alpha * float((ce * scores.mean(0)).sum())


@pytest.mark.parametrize("k, alpha", [(2, 0.1), (1, 0.5)])
def test_aux_loss_is_minimind_formula_per_sequence_summed_over_layers(k, alpha):
    lm = tiny_moe_lm(n_experts=4, k=k, alpha=alpha)
    inputs = {}
    for i, layer in enumerate(lm.moe_layers()):  # what each MoE layer sees
        layer.register_forward_hook(lambda module, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
    ids = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(4))
    lengths = [13, 8, 3]
    mask = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    lm.train()
    lm(ids)
    got = lm.aux_loss_sum(mask)
    expected = 0.0
    for i, layer in enumerate(lm.moe_layers()):
        gate = layer.gate.weight.detach().double().numpy()
        for b, n in enumerate(lengths):  # each sequence on its real tokens only
            expected += minimind_aux_loss(inputs[i][b, :n].double().numpy(), gate, k, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # unpadded, the mean over the batch is MiniMind's batch value
    lm(ids)
    full = sum(minimind_aux_loss(inputs[i][b].double().numpy(), layer.gate.weight.detach().double().numpy(), k, alpha)
               for i, layer in enumerate(lm.moe_layers()) for b in range(3))
    assert lm.aux_loss_sum(torch.ones(3, 13)).item() == pytest.approx(full, rel=1e-5)
    got.backward()  # it trains the gates (through the mean scores)
    assert all(layer.gate.weight.grad.abs().sum() > 0 for layer in lm.moe_layers())


# --- the trainer's objective ---------------------------------------------------------------------


def tiny_moe_video_lm() -> VideoLM:
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, moe=MoEConfig())
    cfg = VideoLMConfig(lm=lm, summary=SummaryConfig(vision_dim=16, n_queries=2, n_layers=1, n_heads=4, n_frames=2),
                        projector=ProjectorConfig("linear"), video_token_id=1)
    return VideoLM(cfg)


def _batch(lengths: list[int], seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    ids = torch.randint(2, 50, (B, L), generator=g)
    ids[:, 1:3] = 1  # the two video placeholders
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    labels = torch.where(mask & (torch.arange(L) >= 4), ids, torch.tensor(-100))
    return Batch(ids * mask, labels, mask, torch.randn(B, 2, 3, 16, generator=g), torch.arange(B), torch.ones(B, dtype=torch.long))


def _sgd_step(model: VideoLM, micro: list[Batch]):
    """train_step with plain SGD at rate 1 and no clipping: the weights move by minus the gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": params, "lr_scale": 1.0}], lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_step(model, micro, optimizer, params, 1.0, 0.0, Dist(), torch.device("cpu"))
    return stats, [b - p.detach() for b, p in zip(before, model.parameters())]


def test_the_update_minimises_token_loss_plus_minimind_aux_loss():
    batches = [_batch([9, 7], seed=1), _batch([8, 5], seed=2)]
    model = tiny_moe_video_lm()
    reference = copy.deepcopy(model)
    # the objective written out: mean token loss over the global batch + the balance loss summed
    # over layers, each averaged over the sequences of the global batch (MiniMind's loss += aux_loss)
    n_target = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    ce_sum, aux_sum = 0.0, 0.0
    for b in batches:
        logits, _ = reference(b.input_ids, video=b.video)
        ce_sum = ce_sum + F.cross_entropy(logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(), reduction="sum")
        aux_sum = aux_sum + reference.lm.aux_loss_sum(b.attention_mask)
    (ce_sum / n_target + aux_sum / 4).backward()

    stats, moved = _sgd_step(model, batches)
    assert stats.loss == pytest.approx(ce_sum.item() / n_target, rel=1e-6)
    assert stats.aux_loss == pytest.approx(aux_sum.item() / 4, rel=1e-6) and stats.aux_loss > 0
    for (name, p), delta in zip(reference.named_parameters(), moved):
        torch.testing.assert_close(delta, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    # the LM frozen: the balance loss only trains the routers, so it is left out (still logged)
    frozen, reference = tiny_moe_video_lm(), tiny_moe_video_lm()
    set_trainable(frozen, ("summary", "projector"))
    ce_sum = sum(F.cross_entropy(reference(b.input_ids, video=b.video)[0][:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                 reduction="sum") for b in batches)
    (ce_sum / n_target).backward()
    stats_frozen, moved_frozen = _sgd_step(frozen, batches)
    assert stats_frozen.aux_loss == pytest.approx(stats.aux_loss, rel=1e-6)
    for (name, p), delta in zip(reference.named_parameters(), moved_frozen):
        expected = p.grad if not name.startswith("lm.") else torch.zeros_like(p)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6, msg=name)

    # one micro-batch of the four sequences: the same update
    whole = Batch(*(torch.cat(pair) for pair in zip(_pad(batches[0], 9)._tensors(), _pad(batches[1], 9)._tensors())))
    stats_whole, moved_whole = _sgd_step(tiny_moe_video_lm(), [whole])
    assert stats_whole.aux_loss == pytest.approx(stats.aux_loss, rel=1e-5)
    for a, b in zip(moved, moved_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _pad(batch: Batch, length: int) -> Batch:
    extra = length - batch.input_ids.shape[1]
    return Batch(F.pad(batch.input_ids, (0, extra)), F.pad(batch.labels, (0, extra), value=-100),
                 F.pad(batch.attention_mask, (0, extra)), batch.video, batch.rows, batch.video_counts)


# --- the flags ------------------------------------------------------------------------------------


def _model_cfg(**flags) -> LMConfig:
    cfg = TrainConfig(manifest=Path("m"), store="s", out=Path("o"), preset="tiny", **flags)
    tok = SimpleNamespace(vocab_size=320, video_id=5)
    store = SimpleNamespace(width=32, frames=3, tokens_per_frame=5)
    return model_config(cfg, tok, store, None).lm  # type: ignore[arg-type]


def test_moe_flags_build_the_lm(tmp_path):
    assert _model_cfg().moe is None
    assert _model_cfg(moe=True).moe == MoEConfig(n_experts=4, experts_per_token=2, shared_expert=True,
                                                 aux_loss_alpha=0.1, norm_topk_prob=True)  # MiniMind's
    args = run_train.build_parser().parse_args(["train", "--out", "o", "--moe", "--experts", "6", "--experts-per-token", "1",
                                                "--no-shared-expert", "--aux-loss-alpha", "0.01"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "out")}
    assert _model_cfg(**flags).moe == MoEConfig(n_experts=6, experts_per_token=1, shared_expert=False, aux_loss_alpha=0.01)
    with pytest.raises(TrainerError, match="--experts need --moe"):
        _model_cfg(experts=8)
    with pytest.raises(TrainerError, match="experts_per_token must be between 1 and n_experts"):
        _model_cfg(moe=True, experts=2, experts_per_token=3)
    with pytest.raises(TrainerError, match="--init-from takes the model"):
        TrainConfig(manifest=Path("m"), store="s", out=Path("o"), init_from=Path("r"), moe=True).check()
    # an --init-lm MoE file: its experts, routing settings changeable
    path = minimind_file(qwen2_moe(4, 2, True, True), tmp_path / "moe.pth", "model.py", shared=True)
    cfg = dict(manifest=Path("m"), store="s", out=Path("o"), init_lm=path)
    tok = SimpleNamespace(vocab_size=97, video_id=5)
    store = SimpleNamespace(width=32, frames=3, tokens_per_frame=5)
    lm = model_config(TrainConfig(**cfg, experts_per_token=1), tok, store, None).lm  # type: ignore[arg-type]
    assert lm.moe == MoEConfig(n_experts=4, experts_per_token=1, shared_expert=True)
    with pytest.raises(TrainerError, match="has 4 experts and a shared expert: drop --experts"):
        model_config(TrainConfig(**cfg, experts=8), tok, store, None)  # type: ignore[arg-type]


# --- a tiny run: aux_loss in metrics.jsonl, resume, eval's expert load ----------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    manifest = make_manifest(root, n_videos=12)
    return {"root": root, "manifest": manifest, "store": make_store(root / "store.zarr", manifest)}


MOE_RUN = dict(moe=True, experts=3, steps=4, batch_size=3)


@pytest.fixture(scope="module")
def moe_run(corpus) -> Path:
    args = tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / "moe", **MOE_RUN)
    train(TrainConfig(**args))
    return args["out"]


def test_moe_run_logs_aux_loss_and_resumes_exactly(corpus, moe_run):
    records = [r for r in read_metrics(moe_run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 < r["aux_loss"] < 10 for r in records)
    config = read_run_config(moe_run)
    assert config["model"]["lm"]["moe"] == dataclasses.asdict(MoEConfig(n_experts=3))
    loaded = load_run(moe_run, torch.device("cpu"))
    assert loaded.model.cfg.lm.moe == MoEConfig(n_experts=3) and len(loaded.model.lm.moe_layers()) == 2

    args = tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / "moe_parts", **MOE_RUN)
    train(TrainConfig(**args, stop_after=2))
    train(TrainConfig(**args, resume=True))
    fields = ("step", "loss", "aux_loss", "grad_norm")
    assert [[r[f] for f in fields] for r in read_metrics(args["out"]) if "loss" in r] == [[r[f] for f in fields] for r in records]
    a, b = load_run(moe_run).model.state_dict(), load_run(args["out"]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_give_the_curves_of_one(corpus):
    """The balance loss is averaged over the sequences of the global batch: two processes of two
    sequences each give the losses, aux losses and weights of one process of four."""
    one = tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / "moe_one", **{**MOE_RUN, "batch_size": 4})
    train(TrainConfig(**one))
    two = tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / "moe_two", **{**MOE_RUN, "batch_size": 2})
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "run_train.py"), "train",
                           *cli_args(**two)], cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = [[(r["step"], r["loss"], r["aux_loss"]) for r in read_metrics(run["out"]) if "loss" in r] for run in (one, two)]
    assert [step for step, _, _ in curves[1]] == [1, 2, 3, 4]
    for (s1, l1, a1), (s2, l2, a2) in zip(*curves):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5) and a1 == pytest.approx(a2, rel=1e-5)
    a, b = load_run(one["out"]).model.state_dict(), load_run(two["out"]).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_dense_runs_have_no_moe_fields(corpus):
    args = tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / "dense", steps=1)
    train(TrainConfig(**args))
    assert all("aux_loss" not in r for r in read_metrics(args["out"]))
    assert read_run_config(args["out"])["model"]["lm"]["moe"] is None
    assert "expert_load" not in evaluate(EvalConfig(run=args["out"], threads=1, max_new_tokens=1, max_samples=2))


def _expected_load(run: Path, manifest: Path) -> list[list[float]]:
    """The expert load counted here: every val example run alone (no padding), its gates' top-k
    taken from their outputs by forward hooks."""
    loaded = load_run(run, torch.device("cpu"))
    model, config = loaded.model, loaded.config
    store = open_store(config["store"]["path"])
    data = build_examples(load_manifest(manifest), store, loaded.tok, "val", model.cfg.n_video_tokens,
                          config["train"]["max_len"], loaded.system)
    layers = model.lm.moe_layers()
    counts = np.zeros((len(layers), model.cfg.lm.moe.n_experts))
    k = model.cfg.lm.moe.experts_per_token
    for i, layer in enumerate(layers):
        def hook(module, args, logits, i=i):
            for e in logits.reshape(-1, logits.shape[-1]).argsort(dim=-1, descending=True)[:, :k].flatten().tolist():
                counts[i, e] += 1
        layer.gate.register_forward_hook(hook)
    features = make_features("disk", store.path, [], torch.device("cpu"))
    with torch.no_grad():
        for example in data.items:
            model(torch.as_tensor(example.input_ids, dtype=torch.long)[None], video=features.fetch(list(example.rows)))
    assert len({len(e.input_ids) for e in data.items}) > 1  # eval's batches are padded
    return (counts / counts.sum(1, keepdims=True)).tolist()


def test_eval_reports_the_expert_load_per_layer(corpus, moe_run):
    report = evaluate(EvalConfig(run=moe_run, threads=1, batch_size=4, max_new_tokens=1))
    load = report["expert_load"]
    assert len(load) == 2 and all(len(layer) == 3 and sum(layer) == pytest.approx(1, abs=1e-3) for layer in load)
    np.testing.assert_allclose(load, _expected_load(moe_run, corpus["manifest"]), rtol=0, atol=1e-4)

    labels = corpus["root"] / "labels.json"
    labels.write_text(json.dumps({"v_000": {"colour": {"question": "What colour is the moving object?", "answer": "red"}}}))
    table = accuracy_table(EvalConfig(run=moe_run, labels=labels, threads=1, max_new_tokens=1, max_samples=3))
    lines = table.splitlines()
    header = lines.index(f"| {moe_run.name}: expert load | expert 0 | expert 1 | expert 2 |")
    assert [line.split(" | ")[0] for line in lines[header + 2 :]] == ["| layer 0", "| layer 1"]
