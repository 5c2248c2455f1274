"""The comparison table of `run_train.py eval --table [--compare RUN ...]`.

`accuracy_table` prints one Markdown table: accuracy by question type (rows; a type that no
evaluated question asks is left out) for the run as
trained, with its video features zeroed and with no video at all, then each ``--compare`` run
(columns), beside the chance level. With ``--compare`` runs, three more rows describe each run
as trained (the ablation columns leave them blank, as they are the first run again):

- ``connector (--summary)``: the run's connector kind (`model.connectors`), with concat's tokens
  per frame (``k``) and pool's stride (``s``);
- ``video tokens per video``: the model's ``n_video_tokens``, from the run's config.json (what
  `trainer.run.load_run` builds the model from; no weights are loaded for it);
- ``training samples/s``: `samples_per_s` of the run's metrics.jsonl (its docstring says exactly
  what is counted).

A single run (no ``--compare``) gets the accuracy rows only, as before these rows existed.
Under the table, each run (as trained) whose LM is a mixture of experts gets a table of its
expert load per layer (`expert_load_table`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import VideoLMConfig
from trainer.errors import TrainerError
from trainer.evaluate import EvalConfig, evaluate
from trainer.metrics import MetricsLog
from trainer.run import read_run_config


def accuracy_table(cfg: EvalConfig, compare: Sequence[Path] = ()) -> str:
    """A Markdown table of accuracy by question type (needs ``cfg.labels``): the run as trained,
    with its video features zeroed and with no video at all, then each run of ``compare`` (e.g.
    the `cinego` summary trained with the same budget), beside the chance level. With ``compare``
    runs, rows of each trained run's connector, video tokens per video and training samples/s
    (`run_facts`) follow. Below it, for each run (as trained) whose LM is a mixture of experts, a
    table of its expert load per layer."""
    if cfg.labels is None:
        raise TrainerError("the accuracy table needs --labels")
    reports: dict[str, dict[str, Any]] = {}
    trained: dict[str, Path] = {}  # the columns that are a run as trained -> its directory
    for ablate in (None, "zero-video", "no-video"):
        name = f"{cfg.run.name}" + (f" ({ablate})" if ablate else "")
        reports[name] = evaluate(dataclasses.replace(cfg, ablate=ablate))
    trained[cfg.run.name] = Path(cfg.run)
    for run in compare:
        reports[Path(run).name] = evaluate(dataclasses.replace(cfg, run=Path(run), ablate=None))
        trained[Path(run).name] = Path(run)
    columns = {name: report["by_type"] for name, report in reports.items()}
    first = next(iter(columns.values()))
    lines = ["| question type | n | chance | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for qtype, stats in first.items():
        if not any(columns[c][qtype]["n"] for c in columns):
            continue  # a type no evaluated question asks (labels of conversations not in these manifests)
        cells = [_percent(columns[c][qtype]["accuracy"]) for c in columns]
        lines.append(f"| {qtype} | {stats['n']} | {stats['chance']:.0%} | " + " | ".join(cells) + " |")
    if compare:
        facts = {name: run_facts(run) for name, run in trained.items()}
        for label, cell in (("connector (--summary)", lambda f: f.connector),
                            ("video tokens per video", lambda f: str(f.video_tokens)),
                            ("training samples/s", lambda f: _rate(f.samples_per_s))):
            cells = [cell(facts[c]) if c in facts else "" for c in columns]
            lines.append(f"| {label} |  |  | " + " | ".join(cells) + " |")
    for name, report in reports.items():
        if "expert_load" in report and report["ablate"] is None:
            lines += ["", *expert_load_table(name, report["expert_load"])]
    return "\n".join(lines)


def expert_load_table(run: str, load: Sequence[Sequence[float]]) -> list[str]:
    """Markdown lines: the share of the routed choices each expert got, one row per layer."""
    n_experts = len(load[0]) if load else 0
    lines = [f"| {run}: expert load | " + " | ".join(f"expert {e}" for e in range(n_experts)) + " |",
             "|---|" + "---|" * n_experts]
    lines += [f"| layer {i} | " + " | ".join(f"{share:.0%}" for share in layer) + " |" for i, layer in enumerate(load)]
    return lines


# --- what each trained run is ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """A trained run's row of the comparison: its connector, its video tokens, its speed."""

    connector: str  # the --summary kind, with concat's k or pool's s
    video_tokens: int  # video placeholder tokens per video (the model's n_video_tokens)
    samples_per_s: float | None  # `samples_per_s` of its metrics.jsonl; None when it cannot tell


def run_facts(run: str | Path) -> RunFacts:
    """`RunFacts` of the run directory ``run``, from its config.json and metrics.jsonl."""
    run = Path(run).expanduser()
    config = read_run_config(run)
    try:
        model_cfg = VideoLMConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise TrainerError(f"{run}/config.json: no readable model config ({err})") from err
    summary = model_cfg.summary
    connector = summary.kind
    if summary.kind == "concat":
        connector += f" (k={summary.concat_tokens})"
    elif summary.kind == "pool":
        connector += f" (s={summary.pool_stride})"
    if not isinstance(config.get("global_batch"), int):
        raise TrainerError(f"{run}/config.json: no global_batch (a run of another version?)")
    rate = samples_per_s(MetricsLog(run / "metrics.jsonl").read(), config["global_batch"])
    return RunFacts(connector, model_cfg.n_video_tokens, rate)


def samples_per_s(records: Sequence[dict[str, Any]], global_batch: int) -> float | None:
    """Training samples per second of a run's metrics.jsonl ``records``, in file order.

    Every optimizer step trains exactly ``global_batch`` samples (batch size x grad accum x
    processes: `trainer.batching.BatchPlan` fills the last batch of an epoch from the start of
    the permutation; text-only copies count as samples). A training line (one with ``loss``) says
    ``step`` and ``elapsed_s``, the seconds since its launch of ``run_train.py train`` began. The
    rate is taken over the intervals between consecutive training lines of the same launch:

        samples/s = global_batch x sum(step_b - step_a) / sum(elapsed_b - elapsed_a)

    over every pair (a, b) of consecutive training lines such that
    - no evaluation line (``val_loss``, from ``--eval-every``) lies between them: the time of an
      evaluation inside the loop is not training, so such an interval is left out whole;
    - ``elapsed_s`` grows from a to b: it goes back where a resumed launch begins (each launch
      counts from its own start), and that pair spans two launches.
    So what comes before a launch's first training line is never counted: its preparation (the
    tokenizer trained, the feature cache loaded, the model built) and its first ``--log-every``
    steps; nor is the final evaluation and checkpoint after the last line. What is counted is the
    loop as it runs: data, forward, backward, optimizer, logging, the loss plot it redraws, and a
    ``--save-every`` checkpoint (not logged, so not separable). Known blind spot: a resumed launch
    whose first line comes later after its start than the previous launch's last line did after
    its own start does not show where it begins (nothing in metrics.jsonl marks a launch), and its
    first interval is then wrong; a run never resumed (the demo's) has no such interval.

    None when no interval qualifies (fewer than two training lines in any launch, e.g. a run
    shorter than twice ``--log-every``)."""
    steps, seconds = 0, 0.0
    previous: dict[str, Any] | None = None
    for record in records:
        if "val_loss" in record:
            previous = None  # an evaluation: the interval that holds it is not training time
            continue
        if "loss" not in record or not isinstance(record.get("elapsed_s"), (int, float)) or "step" not in record:
            continue
        if previous is not None and record["elapsed_s"] > previous["elapsed_s"] and record["step"] > previous["step"]:
            steps += record["step"] - previous["step"]
            seconds += record["elapsed_s"] - previous["elapsed_s"]
        previous = record
    return global_batch * steps / seconds if seconds > 0 else None


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"
