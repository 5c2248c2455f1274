"""The training loop: exact resume, torchrun DDP, frozen parts, staged runs, --init-lm, and no
CLIP or decord in a training process."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import VideoLM
from trainer.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.batching import BatchDataset, BatchPlan, BatchStream
from trainer.examples import build_examples
from trainer.features import RamFeatures
from trainer.errors import TrainerError
from trainer.loss import token_loss_sum
from trainer.run import load_run, read_run_config
from trainer.store import open_store
from trainer.config import TrainConfig
from trainer.optim import set_trainable
from trainer.train import train
from trainer_helpers import (PYTHON, REPO, TORCHRUN, cli_args, make_manifest, make_store, read_metrics, subprocess_env,
                             tiny_train_args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    manifest = make_manifest(root, n_videos=12)
    store = make_store(root / "store.zarr", manifest, status={1: 2})
    return {"root": root, "manifest": manifest, "store": store}


def run_args(corpus: dict, name: str, **overrides) -> dict:
    return tiny_train_args(corpus["manifest"], corpus["store"], corpus["root"] / name, **overrides)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


@pytest.mark.parametrize("cache", [{"feature_cache": "ram"}, {"feature_cache": "disk", "workers": 2}], ids=["ram", "disk-workers"])
def test_resume_continues_bit_for_bit(corpus, cache):
    """Stopped after 5 of 9 steps (past an epoch's end) and resumed: the same losses, weights,
    optimizer tensors and evaluations as the uninterrupted run, and the loop's state recorded."""
    name = cache["feature_cache"]
    settings = dict(steps=9, grad_accum=2, batch_size=3, eval_every=2, **cache)
    whole = run_args(corpus, f"whole-{name}", **settings)
    train(TrainConfig(**whole))
    parts = run_args(corpus, f"parts-{name}", **settings)
    first = train(TrainConfig(**parts, stop_after=5))
    assert first.step == 5 and latest_checkpoint(parts["out"]).name == "step-00000005"
    with pytest.raises(TrainerError, match="already holds a run"):
        train(TrainConfig(**parts))
    with pytest.raises(TrainerError, match="--lr"):
        train(TrainConfig(**{**parts, "lr": 1e-2}, resume=True))
    second = train(TrainConfig(**parts, resume=True))
    assert second.step == 9

    assert read_metrics(parts["out"]) != [] and losses(parts["out"]) == losses(whole["out"])  # the same floats
    assert [s for s, _ in losses(parts["out"])] == list(range(1, 10))
    val = [(r["step"], r["val_loss"]) for r in read_metrics(whole["out"]) if "val_loss" in r]
    assert [s for s, _ in val] == [2, 4, 6, 8, 9]
    assert [(r["step"], r["val_loss"]) for r in read_metrics(parts["out"]) if "val_loss" in r] == val
    a, b = weights(whole["out"]), weights(parts["out"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt_a, ckpt_b = latest_checkpoint(whole["out"]), latest_checkpoint(parts["out"])
    oa, ob = load_file(str(ckpt_a / "optimizer.safetensors")), load_file(str(ckpt_b / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    state = json.loads((ckpt_b / "state.json").read_text())
    best_step, best = min(val, key=lambda sv: sv[1])
    spe = read_run_config(parts["out"])["steps_per_epoch"]
    assert spe < 5, "the stop must fall after an epoch's end"
    assert (state["step"], state["epoch"], state["best_step"], state["best_val_loss"]) == (9, 9 // spe, best_step, best)
    assert state["val_loss"] == val[-1][1] == second.val_loss and state["loss"] == losses(whole["out"])[-1][1]
    assert isinstance(state["rng"]["torch"], list)
    assert (parts["out"] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run resumes to nothing
    assert train(TrainConfig(**parts, resume=True)).step == 9


def test_the_loop_state_is_saved_and_restored_whole(tmp_path):
    """Every field of TrainState comes back from a checkpoint as it was saved (the RNG states
    as they were at the save), and the step of the checkpoint counts as saved."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = TrainState(step=7, epoch=2, loss=0.25, val_loss=0.5, best_val_loss=0.375, best_step=4, saved_step=3)
    ckpt = save_checkpoint(tmp_path, state, model, optimizer, keep=2)
    expected_rng = torch.get_rng_state()
    torch.rand(5)  # the RNG moves on after the save
    other = torch.nn.Linear(3, 2)
    back = load_checkpoint(ckpt, other, torch.optim.AdamW(other.parameters()), torch.device("cpu"))
    assert back == TrainState(step=7, epoch=2, rng=state.rng, loss=0.25, val_loss=0.5, best_val_loss=0.375, best_step=4, saved_step=7)
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_run_made_before_a_setting_existed_resumes_with_what_it_did(corpus):
    args = run_args(corpus, "older", steps=2, lm_lr_ratio=1.0)
    train(TrainConfig(**args, stop_after=1))
    config_path = args["out"] / "config.json"
    config = json.loads(config_path.read_text())
    for added_later in ("lm_lr_ratio", "text_only_fraction"):  # as an older version wrote it
        del config["train"][added_later]
    config_path.write_text(json.dumps(config))
    with pytest.raises(TrainerError, match="--lm-lr-ratio 1.0, not 0.1"):  # it trained the LM at the full rate
        train(TrainConfig(**{**args, "lm_lr_ratio": 0.1}, resume=True))
    assert train(TrainConfig(**args, resume=True)).step == 2


def test_grad_accumulation_equals_a_bigger_batch(corpus):
    big = run_args(corpus, "big", steps=3, batch_size=4)
    small = run_args(corpus, "accum", steps=3, batch_size=2, grad_accum=2)
    train(TrainConfig(**big))
    train(TrainConfig(**small))
    for (s1, l1), (s2, l2) in zip(losses(big["out"]), losses(small["out"])):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)


def test_torchrun_two_processes_give_the_loss_curve_of_one(corpus):
    one = run_args(corpus, "one", steps=4, batch_size=4)
    train(TrainConfig(**one))
    two = run_args(corpus, "two", steps=4, batch_size=2)
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "run_train.py"), "train", *cli_args(**two)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_run_config(two["out"])
    assert config["world_size"] == 2 and config["global_batch"] == 4
    curve_one, curve_two = losses(one["out"]), losses(two["out"])
    assert [s for s, _ in curve_two] == [1, 2, 3, 4]
    for (s1, l1), (s2, l2) in zip(curve_one, curve_two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    a, b = weights(one["out"]), weights(two["out"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_only_the_chosen_parts_get_gradients(corpus):
    store = open_store(corpus["store"])
    stage1 = run_args(corpus, "stage1", steps=2)
    train(TrainConfig(**stage1))
    loaded = load_run(stage1["out"], torch.device("cpu"))
    from manifests.manifest import load_manifest

    examples = build_examples(load_manifest(corpus["manifest"]), store, loaded.tok, "train",
                              loaded.model.cfg.n_video_tokens, 128)
    plan = BatchPlan(examples.lengths, batch_size=4)
    batch = next(BatchStream(BatchDataset(examples.items, RamFeatures(store.path, examples.rows), loaded.tok.pad_id), plan).epoch(0))
    for parts in [("summary",), ("projector",), ("lm",), ("summary", "projector")]:
        model = VideoLM(loaded.model.cfg)
        set_trainable(model, parts)
        logits, _ = model(batch.input_ids, video=batch.video)
        token_loss_sum(logits, batch.labels).backward()
        for name, param in model.named_parameters():
            part = name.split(".")[0]
            if part in parts:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:
                assert param.grad is None and not param.requires_grad, name

    # staged training: stage 2 starts from stage 1 and learns only summary and projector
    with pytest.raises(TrainerError, match="--init-from takes the model"):
        train(TrainConfig(**run_args(corpus, "bad", init_from=stage1["out"])))
    stage2 = run_args(corpus, "stage2", steps=2, init_from=stage1["out"], train_parts=("summary", "projector"))
    for key in ("preset", "vocab_size", "queries", "summary_layers", "summary_heads"):
        stage2.pop(key)
    train(TrainConfig(**stage2))
    before, after = weights(stage1["out"]), weights(stage2["out"])
    for name in before:
        if name.startswith("lm."):
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name
    assert (stage2["out"] / "tokenizer.json").read_bytes() == (stage1["out"] / "tokenizer.json").read_bytes()
    assert read_run_config(stage2["out"])["model"] == read_run_config(stage1["out"])["model"]

    # a staged run that died before its first checkpoint resumes from --init-from's weights again
    crashed = {**stage2, "out": corpus["root"] / "stage2_crashed"}
    train(TrainConfig(**crashed, stop_after=1))
    shutil.rmtree(crashed["out"] / "checkpoints")
    train(TrainConfig(**crashed, resume=True))
    assert losses(crashed["out"]) == losses(stage2["out"])


def test_training_process_never_imports_clip_or_decord(corpus, tmp_path):
    # poisoned stand-ins: importing either anywhere (main process or a DataLoader worker) fails the run
    for name in ("open_clip", "decord"):
        (tmp_path / "poison" / name).mkdir(parents=True)
        (tmp_path / "poison" / name / "__init__.py").write_text(f"raise RuntimeError('{name} imported during training')\n")
    args = run_args(corpus, "pure", steps=2, feature_cache="disk", workers=1)
    script = (
        "import json, sys, run_train\n"
        f"rc = run_train.main(['train', *{cli_args(**args)!r}])\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'decord'))}))\n"
    )
    env = subprocess_env(tmp_path / "poison", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(PYTHON), "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "modules": []}
    assert latest_checkpoint(args["out"]).name == "step-00000002"


def test_init_lm_from_a_hugging_face_llama_directory(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trainer.tokenization import TokenizerConfig, tokenizer

    llama = tmp_path / "llama"
    tokenizer(TokenizerConfig(manifest=corpus["manifest"], out=llama, vocab_size=320))
    vocab = json.loads((llama / "tokenizer.json").read_text())
    n_tokens = len(vocab["model"]["vocab"])
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=n_tokens, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(llama)  # config.json + model.safetensors, next to tokenizer.json

    args = run_args(corpus, "from_llama", steps=2, init_lm=llama, train_parts=("summary", "projector"))
    for key in ("preset", "vocab_size"):
        args.pop(key)
    train(TrainConfig(**args))
    config = read_run_config(args["out"])
    assert config["model"]["lm"]["dim"] == 64 and config["model"]["lm"]["vocab_size"] == n_tokens
    assert config["tokenizer"]["source"] == str(llama)

    loaded = load_run(args["out"], torch.device("cpu"))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3 % n_tokens]])
    with torch.no_grad():
        ours = loaded.model.lm(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # the frozen LM is the Llama

    # a tokenizer with more tokens than the LM has is refused
    big = tmp_path / "big"
    tokenizer(TokenizerConfig(manifest=corpus["manifest"], out=big, vocab_size=n_tokens + 40))
    bad = run_args(corpus, "too_big", steps=1, init_lm=llama, tokenizer=big / "tokenizer.json")
    for key in ("preset", "vocab_size"):
        bad.pop(key)
    with pytest.raises(TrainerError, match="tokenizer has .* tokens but --init-lm"):
        train(TrainConfig(**bad))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_with_a_gpu_feature_cache(corpus):
    args = run_args(corpus, "cuda", steps=6, feature_cache="gpu", device="cuda", save_every=3)
    result = train(TrainConfig(**args))
    assert result.step == 6 and all(math.isfinite(l) for _, l in losses(args["out"]))
    assert losses(args["out"])[-1][1] < losses(args["out"])[0][1]
    state = json.loads((latest_checkpoint(args["out"]) / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    resumed = run_args(corpus, "cuda_resumed", steps=6, feature_cache="gpu", device="cuda")
    train(TrainConfig(**resumed, stop_after=3))
    train(TrainConfig(**resumed, resume=True))
    for (s1, l1), (s2, l2) in zip(losses(args["out"]), losses(resumed["out"])):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3)  # bf16 and atomics: close, not bitwise
    loaded = load_run(args["out"], torch.device("cpu"))  # a GPU run loads on the CPU
    assert loaded.step == 6
