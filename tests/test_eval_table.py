"""The comparison table (`trainer.eval_table`): each run's connector, video tokens per video
(the literal counts of model/connectors.py's formulas) and training samples/s (worked out by hand
from metrics.jsonl), beside the accuracy columns, for several --compare runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import run_train
import trainer.eval_table as eval_table
from trainer.config import TrainConfig
from trainer.eval_table import accuracy_table, run_facts, samples_per_s
from trainer.evaluate import EvalConfig
from trainer.train import train
from trainer_helpers import make_manifest, make_store, read_metrics, tiny_train_args

# 3 frames of 17 tokens (CLS + a 4 x 4 patch grid), so by model/connectors.py's formulas:
# full Q = 4 (combine sum), mean T = 17, concat F*k = 3*9 = 27, vchatgpt F + T - 1 = 3 + 16 = 19,
# pool F * ceil(g/s)^2 = 3 * ceil(4/2)^2 = 12
FRAMES, TOKENS = 3, 17
RUNS = {  # run name: (TrainConfig overrides, connector cell, video tokens)
    "full": ({}, "full", 4),
    "mean": ({"summary": "mean"}, "mean", 17),
    "concat": ({"summary": "concat", "concat_tokens": 9}, "concat (k=9)", 27),
    "vchatgpt": ({"summary": "vchatgpt"}, "vchatgpt", 19),
    "pool": ({"summary": "pool", "pool_stride": 2}, "pool (s=2)", 12),
}
BATCH = 4
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_table")
    manifest = make_manifest(root, n_videos=8)
    store = make_store(root / "store.zarr", manifest, frames=FRAMES, tokens=TOKENS, width=32)
    dirs = {}
    for name, (overrides, _, _) in RUNS.items():
        args = tiny_train_args(manifest, store, root / name, steps=STEPS, batch_size=BATCH, log_every=1, **overrides)
        if name != "full":  # the queries' flags are refused by the query-free connectors
            args.update(queries=None, summary_layers=None, summary_heads=None)
        if dirs:  # one tokenizer for all: no BPE trained per run
            args["tokenizer"] = dirs["full"] / "tokenizer.json"
        train(TrainConfig(**args))
        dirs[name] = root / name
    labels = root / "labels.json"
    labels.write_text(json.dumps({"v_000": {"colour": {"question": "What colour is the moving object?", "answer": "red"}},
                                  # a type the manifest never asks: no row
                                  "v_000+v_001": {"same": {"question": "Same colour?", "answer": "no"}}}))
    return {"root": root, "dirs": dirs, "labels": labels}


def _rate_by_hand(run: Path) -> float:
    """One launch, a line every step, no evaluation inside the loop: the intervals between the
    lines add up to last minus first."""
    lines = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    return BATCH * (lines[-1]["step"] - lines[0]["step"]) / (lines[-1]["elapsed_s"] - lines[0]["elapsed_s"])


def test_samples_per_s_of_a_history_with_evaluations_and_a_resume():
    records = [
        {"step": 50, "epoch": 0, "loss": 3.0, "tokens": 900, "tokens_per_s": 800.0, "elapsed_s": 10.0},  # after startup
        {"step": 100, "epoch": 0, "loss": 2.5, "tokens": 900, "tokens_per_s": 850.0, "elapsed_s": 15.0},  # 50 steps in 5 s
        {"step": 100, "val_loss": 2.6},  # --eval-every 100
        {"step": 150, "epoch": 1, "loss": 2.2, "tokens": 900, "tokens_per_s": 700.0, "elapsed_s": 22.0},  # holds the eval
        {"step": 200, "epoch": 1, "loss": 2.0, "tokens": 900, "tokens_per_s": 720.0, "elapsed_s": 26.0},  # 50 steps in 4 s
        {"step": 250, "epoch": 1, "loss": 1.9, "tokens": 900, "tokens_per_s": 600.0, "elapsed_s": 8.0},  # resumed launch
        {"step": 300, "epoch": 2, "loss": 1.8, "tokens": 900, "tokens_per_s": 650.0, "elapsed_s": 13.0},  # 50 steps in 5 s
        {"step": 300, "val_loss": 1.85},  # the final evaluation
    ]
    assert samples_per_s(records, 16) == pytest.approx(16 * 150 / 14)
    assert samples_per_s(records[:2], 16) == pytest.approx(16 * 50 / 5)
    assert samples_per_s(records[:1], 16) is None  # one line: its time includes the startup
    assert samples_per_s(records[:4], 16) == pytest.approx(16 * 50 / 5)  # the eval's interval left out
    assert samples_per_s([], 16) is None


def test_run_facts_read_config_and_metrics(runs, tmp_path):
    for name, (_, connector, tokens) in RUNS.items():
        facts = run_facts(runs["dirs"][name])
        assert (facts.connector, facts.video_tokens) == (connector, tokens)
        assert facts.samples_per_s == pytest.approx(_rate_by_hand(runs["dirs"][name]))
    # the same run with a history written by hand: the global batch is the run's (4)
    fake = tmp_path / "fake"
    shutil.copytree(runs["dirs"]["mean"], fake)
    lines = [{"step": 10, "loss": 2.0, "elapsed_s": 7.5}, {"step": 30, "loss": 1.5, "elapsed_s": 9.5},
             {"step": 30, "val_loss": 1.6}]
    (fake / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_facts(fake).samples_per_s == pytest.approx(4 * 20 / 2.0)
    (fake / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert run_facts(fake).samples_per_s is None


@pytest.fixture
def fake_evaluate(monkeypatch):
    """`evaluate` as the table calls it, replaced by known shares: each column its own accuracy."""
    def evaluate(cfg):
        share = {None: 0.5, "zero-video": 0.25, "no-video": 0.0}[cfg.ablate] + 0.01 * len(cfg.run.name)
        return {"ablate": cfg.ablate, "by_type": {"colour": {"accuracy": share, "chance": 0.25, "n": 3},
                                                  "shape": {"accuracy": None, "chance": 1 / 3, "n": 0}}}
    monkeypatch.setattr(eval_table, "evaluate", evaluate)


def _expected_table(runs: dict, compare: list[str]) -> list[str]:
    names = ["full", "full (zero-video)", "full (no-video)", *compare]
    trained = {"full": "full", **{c: c for c in compare}}
    share = {n: (0.25 if "zero" in n else 0.0 if "no-video" in n else 0.5) + 0.01 * len(trained.get(n, "full")) for n in names}
    lines = ["| question type | n | chance | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names),
             "| colour | 3 | 25% | " + " | ".join(f"{share[n]:.0%}" for n in names) + " |"]
    # shape: no column has a question of it (n 0 everywhere), so it has no row
    if compare:
        def cells(value):
            return " | ".join(value(trained[n]) if n in trained else "" for n in names)
        lines += ["| connector (--summary) |  |  | " + cells(lambda r: RUNS[r][1]) + " |",
                  "| video tokens per video |  |  | " + cells(lambda r: str(RUNS[r][2])) + " |",
                  "| training samples/s |  |  | " + cells(lambda r: f"{_rate_by_hand(runs['dirs'][r]):.1f}") + " |"]
    return lines


def test_the_table_has_a_column_per_run_and_rows_of_what_each_run_is(runs, fake_evaluate):
    compare = ["mean", "concat", "vchatgpt", "pool"]
    cfg = EvalConfig(run=runs["dirs"]["full"], labels=runs["labels"])
    table = accuracy_table(cfg, [runs["dirs"][c] for c in compare])
    assert table.splitlines() == _expected_table(runs, compare)
    # one run alone: the accuracy rows only, as before
    assert accuracy_table(cfg).splitlines() == _expected_table(runs, [])


def test_eval_cli_takes_several_compare_runs(runs, fake_evaluate, capsys):
    compare = ["vchatgpt", "pool"]
    argv = ["eval", "--run", str(runs["dirs"]["full"]), "--labels", str(runs["labels"]), "--table",
            "--compare", *(str(runs["dirs"][c]) for c in compare)]
    assert run_train.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == _expected_table(runs, compare)


def test_the_real_evaluation_fills_the_table(runs):
    cfg = EvalConfig(run=runs["dirs"]["full"], labels=runs["labels"], threads=1, max_new_tokens=1, max_samples=2)
    lines = accuracy_table(cfg, [runs["dirs"]["mean"]]).splitlines()
    assert lines[0] == "| question type | n | chance | full | full (zero-video) | full (no-video) | mean |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| colour", "| connector (--summary)", "| video tokens per video", "| training samples/s"]
    assert lines[-2] == "| video tokens per video |  |  | 4 |  |  | 17 |"

