"""`run_train.py serve`: a local web chat page (Gradio) over one run, or two side by side.

The page: pick a cached row of the store (val split first) or upload a video; see the F frames
the model reads (the `show` contact sheet: a row's frames decoded again at the indices the store
recorded, an upload's as its encoding decoded them); ask, and watch the answer stream; keep
asking (every turn goes through the run's chat template, `trainer.chat.ChatSession`, the same
conversation code as the terminal chat); with ``compare``, each question is answered by both
runs, side by side. A cached row's reference conversations from the manifest are shown, and the
reference answer of a question asked as the manifest asks it.

Decisions written down here:
- Gradio is imported only by `serve` / `start` (the optional ``[web]`` extra): training,
  evaluation and the terminal chat never need it.
- The server binds 127.0.0.1 unless told otherwise: a model page is not meant for the network.
- Uploads land in a temporary folder of this server (Gradio's upload folder, pointed there),
  are refused above ``max_upload_mb`` by Gradio before they are stored, and each is deleted as
  soon as it is encoded or refused (only its features and frames are kept, in the tab's state,
  which Gradio drops when the tab closes); the folder is removed when the server stops.
- The encoder (the store's, with its frames, sampling and layer: `pipeline.extract.FileEncoder`)
  is loaded once per server, on the first upload; a server that only shows cached rows never
  loads it.
- Bad input is one line on the page (not a video, no video stream, too long, ...); an
  unexpected failure is logged with its traceback on the server and shown as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from manifests.formats import clean_text
from manifests.manifest import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from trainer.chat import VIDEO_PREFIX, ChatSession, GenerationFlags, store_features
from trainer.errors import TrainerError
from trainer.evaluate import normalise
from trainer.run import LoadedRun, load_run, pick_device
from trainer.store import StoreInfo, check_same_signature, check_store_matches_manifest, open_store

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServeConfig:
    """`run_train.py serve`: see its --help for every field."""

    run: Path
    compare: Path | None = None  # a second run, answering beside the first
    store: str | Path | None = None  # default: the run's
    manifest: Path | None = None  # default: the run's
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 200.0
    max_video_seconds: float = 3600.0
    max_new_tokens: int = 128  # the page's starting value
    device: str | None = None
    threads: int | None = None


@dataclass
class Video:
    """What a conversation is about: its features (F, T, D), the frames strip, a label."""

    label: str
    features: Tensor
    sheet: Any  # PIL image
    references: list[list[dict[str, str]]] = field(default_factory=list)  # the manifest's conversations


@dataclass
class Conversation:
    """One browser tab's conversation: a video and one chat session per run."""

    video: Video
    sessions: list[ChatSession]


def reference_answer(references: list[list[dict[str, str]]], question: str) -> str | None:
    """The manifest's answer to ``question`` when one of the video's reference conversations
    asks it (compared after answer normalisation, the video marker left out); None otherwise."""
    wanted = normalise(question)
    for conversation in references:
        for turn, reply in zip(conversation, conversation[1:]):
            if turn["role"] == "user" and reply["role"] == "assistant" \
                    and normalise(clean_text(turn["content"])) == wanted:
                return reply["content"]
    return None


def video_seconds(path: Path) -> float | None:
    """The duration a container declares (None when it declares none): checked before decoding,
    so a too-long upload is refused at once."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / 1_000_000
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
    except Exception:  # noqa: BLE001 - an unreadable file is refused by the decoder, with its reason
        return None
    return None


class WebChat:
    """What the page does, without Gradio: the runs, the store's rows, videos and answers."""

    def __init__(self, cfg: ServeConfig) -> None:
        device = pick_device(cfg.device)
        self.cfg = cfg
        self.runs: list[LoadedRun] = [load_run(cfg.run, device)]
        if cfg.compare is not None:
            self.runs.append(load_run(cfg.compare, device))
        main = self.runs[0]
        self.store: StoreInfo = open_store(cfg.store or main.config["store"]["path"])
        for loaded in self.runs:  # one store's features, and one encoding of an upload, feed every run
            check_same_signature(loaded.store_signature, self.store, f"run {loaded.run}")
        from manifests.manifest import load_manifest

        self.manifest_dir = Path(cfg.manifest or main.config["manifest"]["path"])
        manifest = load_manifest(self.manifest_dir)
        check_store_matches_manifest(self.store, manifest)
        from pipeline.store_format import STATUS_NAMES

        entries = [e for e in manifest.videos if e.row < self.store.n_rows]
        entries.sort(key=lambda e: (e.split != "val", e.row))  # the validation split first: never trained on
        self.rows = [(f"{e.video_id} · {e.split} · {STATUS_NAMES.get(int(self.store.status[e.row]), '?')}", e.row)
                     for e in entries]
        self.video_ids = {e.row: e.video_id for e in entries}
        self.references: dict[str, list[list[dict[str, str]]]] = {}
        for sample in manifest.samples():  # the page asks about one video at a time
            if len(sample.video_ids) == 1:
                self.references.setdefault(sample.key, []).append(sample.conversations)
        self._encoder: Any = None
        self._encoder_lock = threading.Lock()

    @property
    def run_names(self) -> list[str]:
        return [f"{loaded.run.name} (step {loaded.step})" for loaded in self.runs]

    def row_video(self, row: int) -> Video:
        """A cached row: its stored features and its contact sheet."""
        from pipeline.contact_sheet import contact_sheet
        from pipeline.errors import ExtractError

        video_id = self.video_ids.get(row)
        if video_id is None:
            raise TrainerError(f"row {row} is not in the store")
        try:
            sheet = contact_sheet(self.store.path, self.manifest_dir, video_id)
        except ExtractError as err:
            raise TrainerError(str(err)) from err
        features = store_features(self.runs[0], self.store.path, row)
        return Video(f"{video_id} (row {row})", features, sheet, self.references.get(video_id, []))

    def file_video(self, path: Path, name: str) -> Video:
        """An uploaded file, encoded as the store was; one-line `TrainerError` for bad input."""
        from pipeline.contact_sheet import render_sheet
        from pipeline.errors import ExtractError

        if Path(name).suffix.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
            raise TrainerError(f"{name}: not a video file ({', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)})")
        seconds = video_seconds(path)
        if seconds is not None and seconds > self.cfg.max_video_seconds:
            raise TrainerError(f"{name}: the video is {seconds:.0f} s long; this server takes up to "
                               f"{self.cfg.max_video_seconds:.0f} s (--max-video-seconds)")
        try:
            tokens, decoded = self.encoder().encode(path)
        except ExtractError as err:
            raise TrainerError(str(err).replace(str(Path(path).resolve()), name)) from err
        features = torch.from_numpy(tokens)
        labels = [f"#{int(i)}" for i in decoded.frame_index]
        sheet = render_sheet(f"{name}  (uploaded; {decoded.n_frames} frames)", decoded.frames, labels)
        return Video(f"{name} (uploaded)", features, sheet)

    def encoder(self) -> Any:
        """The store's encoder, loaded on the first upload and kept."""
        with self._encoder_lock:
            if self._encoder is None:
                try:
                    from pipeline.extract import FileEncoder  # decord + open_clip: only for uploads
                except ImportError as err:
                    raise TrainerError(f"uploads need the extraction pipeline ({err}); pick a cached row") from err
                self._encoder = FileEncoder(self.store.attrs, self.runs[0].device.type)
            return self._encoder

    def conversation(self, video: Video, seed: int = 0) -> Conversation:
        """A new conversation about ``video`` with every run (generation settings come per question)."""
        flags = GenerationFlags(max_new_tokens=self.cfg.max_new_tokens)
        sessions = [ChatSession(loaded, [video.features], flags.generation_config(loaded.tok.stop_ids), seed)
                    for loaded in self.runs]
        return Conversation(video, sessions)

    def ask(self, conv: Conversation, question: str, flags: GenerationFlags) -> Iterator[list[str]]:
        """Every run's answer so far, after each new piece of any of them: the runs take turns
        token by token, so both answers grow side by side."""
        for session in conv.sessions:
            session.gen = flags.generation_config(session.loaded.tok.stop_ids)
        answers = [""] * len(conv.sessions)
        for pieces in zip_longest(*(session.ask(question) for session in conv.sessions)):
            for i, piece in enumerate(pieces):
                if piece is not None:
                    answers[i] += piece
            yield list(answers)


def messages(session: ChatSession, pending: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """A run's conversation in Gradio's messages format (the video marker left out), with the
    question being answered and its answer so far."""
    turns = [{"role": t["role"], "content": t["content"].removeprefix(VIDEO_PREFIX)} for t in session.history]
    if pending is not None:
        turns += [{"role": "user", "content": pending[0]}, {"role": "assistant", "content": pending[1]}]
    return turns


# --- the page ------------------------------------------------------------------------------------

UPLOAD_TYPES = list(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _error(err: BaseException) -> str:
    """The page's one line for a failure: a user mistake as it is, anything else with its type
    (its traceback goes to the server's log, never to the page)."""
    if isinstance(err, TrainerError):
        return f"**Error:** {_one_line(err)}"
    log.error("unexpected failure", exc_info=err)
    return f"**Error:** internal error ({type(err).__name__}: {_one_line(err)}); see the server's log"


def build_page(chat: WebChat) -> Any:
    """The Gradio Blocks of the page (not launched). Element ids (``row``, ``upload``, ``frames``,
    ``status``, ``answer-0``, ``answer-1``, ``question``, ``ask``, ``clear``, ``reference``,
    ``reference-answer``) are stable, for tests and for styling."""
    import gradio as gr

    n = len(chat.runs)

    def chosen(video: Video) -> tuple:
        conv = chat.conversation(video)
        refs = "\n".join(f"- {' / '.join(t['content'].removeprefix(VIDEO_PREFIX) for t in c)}" for c in video.references)
        reference = f"**Reference conversations (manifest)**\n\n{refs}" if refs else ""
        return (conv, video.sheet, f"Video: **{video.label}**. Ask a question.", reference, "",
                *[[] for _ in range(n)])

    def unchanged(conv: Conversation | None, message: str) -> tuple:
        return (conv, gr.update(), message, gr.update(), gr.update(), *[gr.update() for _ in range(n)])

    def pick(conv: Conversation | None, row: int | None) -> tuple:
        if row is None:
            return unchanged(conv, "")
        try:
            return chosen(chat.row_video(int(row)))
        except Exception as err:  # noqa: BLE001 - shown on the page as one line
            return unchanged(conv, _error(err))

    def upload(conv: Conversation | None, path: str | None) -> tuple:
        if path is None:
            return (*unchanged(conv, ""), None)
        try:
            return (*chosen(chat.file_video(Path(path), Path(path).name)), None)
        except Exception as err:  # noqa: BLE001 - shown on the page as one line
            return (*unchanged(conv, _error(err)), None)
        finally:  # only the features and frames are kept: the upload goes at once
            Path(path).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(path).parent.rmdir()  # Gradio's folder for this upload, when it is empty

    def ask(conv: Conversation | None, question: str, temperature: float, top_p: float, max_new: int) -> Iterator[tuple]:
        if conv is None:
            yield (gr.update(), "**Error:** pick a cached row or upload a video first", gr.update(),
                   *[gr.update() for _ in range(n)])
            return
        flags = GenerationFlags(max_new_tokens=int(max_new), temperature=temperature, top_p=top_p)
        reference = reference_answer(conv.video.references, question) if question.strip() else None
        shown = reference or ("" if not conv.video.references else "(no reference answer for this question)")
        started = time.monotonic()
        try:
            for answers in chat.ask(conv, question, flags):
                yield ("", "Answering…", shown, *[messages(s, (question, a)) for s, a in zip(conv.sessions, answers)])
        except Exception as err:  # noqa: BLE001 - shown on the page as one line
            yield (gr.update(), _error(err), gr.update(), *[messages(s) for s in conv.sessions])
            return
        yield ("", f"Answered in {time.monotonic() - started:.1f} s.", shown, *[messages(s) for s in conv.sessions])

    def clear(conv: Conversation | None) -> tuple:
        if conv is None:
            return (None, "", "", *[[] for _ in range(n)])
        return (chat.conversation(conv.video), "Conversation cleared.", "", *[[] for _ in range(n)])

    with gr.Blocks(title="vidcache chat") as page:
        conv_state = gr.State(None)
        gr.Markdown(f"## vidcache chat: {' vs '.join(chat.run_names)}")
        with gr.Row():
            with gr.Column(scale=2):
                row = gr.Dropdown(choices=chat.rows, value=None, filterable=True, elem_id="row",
                                  label=f"Cached row of {Path(chat.store.path).name} (validation split first)")
                file = gr.File(label=f"...or upload a video (up to {chat.cfg.max_upload_mb:g} MiB)",
                               file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")
                frames = gr.Image(label="The frames the model reads", type="pil", interactive=False,
                                  elem_id="frames")
                status = gr.Markdown("Pick a cached row or upload a video.", elem_id="status")
                reference = gr.Markdown("", elem_id="reference")
            with gr.Column(scale=3):
                with gr.Row():
                    answers = [gr.Chatbot(label=name, elem_id=f"answer-{i}", height=420)
                               for i, name in enumerate(chat.run_names)]
                ref_answer = gr.Textbox(label="Reference answer (manifest)", interactive=False,
                                        elem_id="reference-answer")
                question = gr.Textbox(label="Question", placeholder="Ask about the video",
                                      elem_id="question")
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear_button = gr.Button("Clear conversation", elem_id="clear")
                with gr.Accordion("Generation", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                    max_new = gr.Slider(1, 512, value=chat.cfg.max_new_tokens, step=1, label="max new tokens")

        chosen_outputs = [conv_state, frames, status, reference, ref_answer, *answers]
        row.input(pick, [conv_state, row], chosen_outputs)
        file.upload(upload, [conv_state, file], [*chosen_outputs, file])
        ask_inputs = [conv_state, question, temperature, top_p, max_new]
        ask_outputs = [question, status, ref_answer, *answers]
        ask_button.click(ask, ask_inputs, ask_outputs)
        question.submit(ask, ask_inputs, ask_outputs)
        for event in (clear_button.click, *(answer.clear for answer in answers)):  # a chat's own bin too
            event(clear, [conv_state], [conv_state, status, ref_answer, *answers])
    return page


# --- the server ----------------------------------------------------------------------------------


class WebServer:
    """A running page; `close` stops it and removes its uploads."""

    def __init__(self, page: Any, url: str, cleanup: Any) -> None:
        self.page, self.url, self._cleanup = page, url, cleanup

    def close(self) -> None:
        try:
            self.page.close(verbose=False)
        finally:
            self._cleanup.close()


def start(cfg: ServeConfig) -> WebServer:
    """Load the runs, build the page and serve it in background threads."""
    from trainer.run import cpu_threads

    cleanup = contextlib.ExitStack()
    try:
        cleanup.enter_context(cpu_threads(cfg.threads))
        chat = WebChat(cfg)
        uploads = tempfile.mkdtemp(prefix="vidcache-web-")
        cleanup.callback(shutil.rmtree, uploads, ignore_errors=True)
        old = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = uploads  # Gradio stores uploads there (read when the page is built)
        cleanup.callback(lambda: os.environ.pop("GRADIO_TEMP_DIR") if old is None
                         else os.environ.__setitem__("GRADIO_TEMP_DIR", old))
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one line each
        try:
            import gradio as gr
        except ImportError as err:
            raise TrainerError(f"serve needs the web extra: pip install -e '.[web]' ({err})") from err
        page = build_page(chat)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])  # no font fetched from the web
        try:
            _, url, _ = page.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True,
                                    max_file_size=int(cfg.max_upload_mb * 1024 * 1024), theme=theme,
                                    quiet=True, ssr_mode=False, share=False, inbrowser=False)
        except OSError as err:
            raise TrainerError(f"cannot serve on {cfg.host}:{cfg.port}: {_one_line(err)}") from err
        return WebServer(page, url, cleanup)
    except BaseException:
        cleanup.close()
        raise


def serve(cfg: ServeConfig) -> None:
    """Serve the page until Ctrl-C; the uploads go with the server."""
    server = start(cfg)
    print(f"serving {cfg.run}{' and ' + str(cfg.compare) if cfg.compare else ''} on {server.url} (Ctrl-C stops)",
          flush=True)
    try:
        threading.Event().wait()
    finally:
        server.close()
