"""vidcache training CLI: train, eval, chat, describe, serve, tokenizer.

Each command parses its flags into a config dataclass and calls one library function of the
same name in `trainer` (``eval`` calls `trainer.evaluate`). Multi-GPU (or multi-process CPU):
``torchrun --nproc_per_node G run_train.py train ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


THREADS_HELP = "CPU threads of torch (default: its own); 1 is often fastest for tiny models on a busy machine"


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _add_generation(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest answer in tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0 (default: 1.0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    _add_device(g)


def _add_device(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also print the INFO log lines (run and encoder loading) on stderr; by default only "
                        "the result and warnings are printed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_train.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Flags left out are left out of the namespace (SUPPRESS): TrainConfig's defaults, which are the
    # ones the help states, apply to a new run, and a --resume takes them from the run's config.json.
    t = sub.add_parser("train", help="train (or resume) a run from cached features", argument_default=argparse.SUPPRESS)
    t.add_argument("--manifest", type=Path, help="manifest folder (samples, splits); required unless --resume")
    t.add_argument("--store", metavar="PATH_OR_URL",
                   help="the Zarr feature store: a path (STORE.zarr) or an fsspec URL (s3://bucket/store.zarr); "
                        "required unless --resume")
    t.add_argument("--out", type=Path, required=True, help="the run directory")
    m = t.add_argument_group("model and tokenizer")
    m.add_argument("--preset", choices=("tiny", "small", "base"), help="LM size (default small)")
    m.add_argument("--init-lm", type=Path, help="pretrained LM: MiniMind .pth or Hugging Face Llama directory")
    m.add_argument("--init-from", type=Path, metavar="RUN", help="start every part from another run (staged training)")
    m.add_argument("--tokenizer", type=Path, help="tokenizer.json or a directory holding one (default: train a BPE)")
    m.add_argument("--vocab-size", type=int, help="of the BPE trained here (default 6400)")
    m.add_argument("--video-token", help="the video placeholder token (default <|video|>, added if missing)")
    m.add_argument("--summary", choices=("full", "cinego", "mean", "concat", "vchatgpt", "pool"),
                   help="the connector from frame tokens to video tokens (default full): full, cinego (VideoSummary "
                        "queries); mean (T tokens: each token averaged over frames); concat (F*k: --concat-tokens per "
                        "frame); vchatgpt (F + T-1: Video-ChatGPT's temporal and spatial means); pool (LLaVA-Video's "
                        "--pool-stride pooling of each frame's patch grid, with frame positions)")
    m.add_argument("--concat-tokens", type=int, metavar="K",
                   help="--summary concat: tokens per frame, 1 = its CLS token, m*m = its patch grid averaged to m x m "
                        "(default 1)")
    m.add_argument("--pool-stride", type=int, metavar="S",
                   help="--summary pool: S x S average pooling of each frame's patch grid (default 2)")
    m.add_argument("--queries", type=int, help="learnable queries per query set")
    m.add_argument("--summary-layers", type=int, help="VideoSummary layers per query set (default 2)")
    m.add_argument("--summary-heads", type=int, help="attention heads of the VideoSummary (default 8)")
    m.add_argument("--combine", choices=("sum", "concat"), help="how spatial and temporal queries join")
    m.add_argument("--token-mlp", action="store_true",
                   help="a residual MLP on every frame token before the VideoSummary's queries read them (default "
                        "off): lets the summary use features that are non-linear in the frozen CLIP tokens")
    m.add_argument("--projector", choices=("linear", "mlp"), help="vision -> LM projector (default mlp)")
    m.add_argument("--moe", action="store_true",
                   help="MiniMind's mixture-of-experts LM (its use_moe) on any preset: each feed-forward becomes routed "
                        "experts, top-k softmax gating, a shared expert, and the load-balancing loss added to the "
                        "training loss (default dense; an --init-lm MiniMind MoE file is one without the flag)")
    m.add_argument("--experts", type=int, help="--moe: routed experts per layer (default 4)")
    m.add_argument("--experts-per-token", type=int, metavar="K", help="--moe: experts each token is routed to (default 2)")
    m.add_argument("--shared-expert", action=argparse.BooleanOptionalAction,
                   help="--moe: an always-on shared expert beside the routed ones (default on)")
    m.add_argument("--aux-loss-alpha", type=float,
                   help="--moe: weight of each layer's load-balancing loss (default 0.1, MiniMind's)")
    m.add_argument("--system", help="system prompt of the chat template (default none)")
    m.add_argument("--max-len", type=int, help="tokens per sample; longer ones are cut (default 1024)")
    s = t.add_argument_group("schedule")
    length = s.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the training samples (default 1)")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    s.add_argument("--batch-size", type=int, help="per process and micro-batch (default 16)")
    s.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    s.add_argument("--lm-lr-ratio", type=float,
                   help="the LM's learning rate as a fraction of --lr (default 0.1: a fresh LM at the full rate "
                        "learns the answer format so fast that the video signal is drowned)")
    s.add_argument("--text-only-fraction", type=float,
                   help="also train on text-only copies (video left out) of this share of the training samples, so "
                        "that the model has a language prior for prompts without a video (default 0)")
    s.add_argument("--min-lr-ratio", type=float, help="the cosine ends at lr x this (default 0.1)")
    s.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the run)")
    s.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    s.add_argument("--clip", type=float, help="max gradient norm (0: no clipping; default 1.0)")
    s.add_argument("--train", type=_parts, dest="train_parts",
                   metavar="PARTS", help="comma-separated parts that learn: summary,projector,lm (default all)")
    s.add_argument("--seed", type=int, help="seed of the weights and the data order (default 0)")
    r = t.add_argument_group("machinery")
    r.add_argument("--feature-cache", choices=("disk", "ram", "gpu"),
                   help="disk: read the store in DataLoader workers; ram: load the needed rows once into host memory; "
                        "gpu: keep them on the GPU (default disk)")
    r.add_argument("--workers", type=int, help="DataLoader workers for --feature-cache disk (default 2)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own settings (config.json); "
                        "flags given must match them, except machinery and length (--steps, --feature-cache, ...)")
    r.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although the manifest or the store changed since the run started")
    r.add_argument("--eval-every", type=int, help="val loss every N steps (default 0: at the end)")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps (default 0: at the end)")
    r.add_argument("--keep", type=int, help="checkpoints kept (default 2)")
    r.add_argument("--stop-after", type=int, help="stop with a checkpoint after N steps of this launch")
    r.add_argument("--log-every", type=int, help="metrics.jsonl line every N steps (default 1)")
    r.add_argument("--threads", type=int, help=THREADS_HELP)

    e = sub.add_parser("eval", help="validation loss and answer accuracy of a run (JSON)")
    e.add_argument("--run", type=Path, required=True, help="run directory")
    e.add_argument("--manifest", type=Path, help="default: the run's")
    e.add_argument("--store", metavar="PATH_OR_URL", help="feature store, a path or an fsspec URL (default: the run's)")
    e.add_argument("--labels", type=Path, help="labels.json: accuracy by question type")
    e.add_argument("--ablate", choices=("zero-video", "no-video"),
                   help="zero-video: features replaced by zeros; no-video: text-only prompts")
    e.add_argument("--split", choices=("val", "train"), default="val", help="which split to evaluate (default val)")
    e.add_argument("--batch-size", type=int, default=16, help="samples per forward (default 16)")
    e.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer (default 64)")
    e.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    e.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    e.add_argument("--threads", type=int, help=THREADS_HELP)
    e.add_argument("--table", action="store_true",
                   help="with --labels: a Markdown table of accuracy by type for the run, its zero-video and "
                        "no-video ablations and each --compare run, instead of JSON; with --compare, rows of each "
                        "run's connector, video tokens per video and training samples/s follow")
    e.add_argument("--compare", type=Path, nargs="*", default=[], metavar="RUN",
                   help="other runs for the --table, one or several (e.g. other connectors trained with the same "
                        "budget)")
    _add_verbose(e)

    c = sub.add_parser("chat", help="ask a trained run about a video or several (streams the answer)")
    c.add_argument("--run", type=Path, required=True, help="run directory")
    c.add_argument("--video", type=Path, action="append",
                   help="a video file (encoded as the run's store was); repeat it to ask about several videos at once")
    c.add_argument("--store", metavar="PATH_OR_URL",
                   help="feature store holding the video (with --row): a path or an fsspec URL")
    c.add_argument("--row", type=int, action="append", help="a row of --store; repeat it for several videos")
    c.add_argument("--question", help="one question; without it the chat is interactive")
    _add_generation(c)
    _add_verbose(c)

    d = sub.add_parser("describe", help="answer one question for every video in a folder (Markdown table)")
    d.add_argument("--run", type=Path, required=True, help="run directory")
    d.add_argument("--videos", type=Path, required=True, help="folder of video files to describe")
    d.add_argument("--question", default="Describe the video.", help="asked of every video (default: Describe the video.)")
    _add_generation(d)
    _add_verbose(d)

    w = sub.add_parser("serve", help="a local web chat page (Gradio; needs the [web] extra)")
    w.add_argument("--run", type=Path, required=True, help="run directory")
    w.add_argument("--compare", type=Path, metavar="RUN2", help="a second run that answers every question beside the first")
    w.add_argument("--store", metavar="PATH_OR_URL", help="feature store whose rows can be picked (default: the run's)")
    w.add_argument("--manifest", type=Path, help="manifest of the store: video ids, splits, references (default: the run's)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    w.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    w.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload in MiB (default: %(default)s)")
    w.add_argument("--max-video-seconds", type=float, default=3600.0, help="longest upload in seconds (default: %(default)s)")
    w.add_argument("--max-new-tokens", type=int, default=128, help="the page's starting answer length (default: %(default)s)")
    _add_device(w)

    k = sub.add_parser("tokenizer", help="train the byte-level BPE on a manifest's training text")
    k.add_argument("--manifest", type=Path, required=True, help="manifest folder whose training text is used")
    k.add_argument("--out", type=Path, required=True, help="folder to write tokenizer.json into")
    k.add_argument("--vocab-size", type=int, default=6400, help="tokens in the vocabulary (default 6400)")
    return parser


def _config(cls, args: argparse.Namespace, **extra):  # noqa: ANN001, ANN202
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def _read_question() -> str | None:
    """The next question of an interactive chat; None ends it (Ctrl-D, empty line, exit)."""
    if sys.stdin.isatty():
        try:
            line = input("\nyou> ")
        except EOFError:
            return None
    else:  # questions piped in: echo them so the transcript reads as a dialogue
        line = sys.stdin.readline()
        if line.strip():
            print(f"\nyou> {line.strip()}")
    if line.strip() in ("", "exit", "quit", "/exit", "/quit"):
        return None
    print("model> ", end="", flush=True)
    return line


def run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from trainer.errors import TrainerError
        from trainer.config import TrainConfig
        from trainer.resume import resume_config
        from trainer.train import train

        given = {k: v for k, v in vars(args).items() if k != "command"}
        if given.pop("resume", False):
            cfg = resume_config(given.pop("out"), **given)
        elif "manifest" not in given or "store" not in given:
            raise TrainerError("train needs --manifest and --store (or --resume to continue the run in --out)")
        else:
            cfg = TrainConfig(**given)
        result = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            loss = f"{result.loss:.4f}" if result.loss is not None else "-"
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
            print(f"run {result.run}: step {result.step}/{result.total_steps}, loss {loss}, val loss {val}, "
                  f"{result.seconds:.0f} s, checkpoint {result.checkpoint}")
    elif args.command == "eval":
        from trainer.eval_table import accuracy_table
        from trainer.evaluate import EvalConfig, evaluate

        cfg = _config(EvalConfig, args)
        if args.table:
            print(accuracy_table(cfg, args.compare))
        else:
            print(json.dumps(evaluate(cfg), indent=2))
    elif args.command == "chat":
        from trainer.chat import ChatConfig, chat

        interactive = args.question is None
        if interactive and sys.stdin.isatty():
            print("Ask about the video (empty line or Ctrl-D ends).", file=sys.stderr)
        chat(_config(ChatConfig, args), on_text=lambda s: print(s, end="", flush=True),
             read_question=_read_question if interactive else None)
        print()
    elif args.command == "describe":
        from trainer.chat import DescribeConfig, describe, markdown_table

        rows = describe(_config(DescribeConfig, args))
        print(markdown_table(rows))
    elif args.command == "serve":
        from trainer.web import ServeConfig, serve

        serve(_config(ServeConfig, args))
    elif args.command == "tokenizer":
        from trainer.tokenization import TokenizerConfig, tokenizer

        print(tokenizer(_config(TokenizerConfig, args)))
    return 0


def _configure_logging(args: argparse.Namespace) -> None:
    """train and serve log their progress (INFO) on the first rank. eval, chat and describe print a
    result on stdout, so without --verbose they log only this project's warnings: neither its INFO
    lines nor open_clip's chatter (it warns at every load of `--pretrained none` random weights)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    verbose = getattr(args, "verbose", True)  # the commands without --verbose always log
    if not verbose:
        ours = ("manifests", "model", "pipeline", "trainer")
        handler.addFilter(lambda record: record.levelno >= logging.ERROR or record.name.split(".")[0] in ours)
    first_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if first_rank and verbose else logging.WARNING, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    from manifests.manifest import ManifestError
    from model import CheckpointError
    from trainer.errors import TrainerError

    try:
        return run(args)
    except (TrainerError, ManifestError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
