"""`run_train.py serve`: the web chat page, driven end to end in a real headless browser
(Debian's chromium through Selenium), against a tiny run served in this process.

What the page shows is compared with independent references: the terminal chat's answers
(`trainer.chat.open_chat`, its own session, store read and encoding) for the same row, questions
and uploaded file; and what the model received is read by a spy on `stream_generate` (the
prompts it was given, decoded), which also slows each step so that the browser can see the
answer grow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from trainer_helpers import PYTHON, REPO, make_manifest, make_store, subprocess_env, tiny_train_args

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STEP_S = 0.08  # the spy's delay per generated token: a few page updates per answer, at most a few s

Q1, Q2 = "What colour is the moving object?", "And its shape?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A store with demo-tiny's token layout (so uploads encode to what the run reads), a run
    trained long enough (30 steps) to answer with several tokens, and one new demo video."""
    pytest.importorskip("open_clip")
    from manifests.demo_corpus import make_demo_corpus
    from pipeline.encoder import EncoderSpec, load_encoder
    from trainer.config import TrainConfig
    from trainer.train import train

    root = tmp_path_factory.mktemp("web")
    encoder = load_encoder(EncoderSpec("demo-tiny", "none", -1, "fp32")).attrs  # as the pipeline records it
    manifest = make_manifest(root, n_videos=6)
    store = make_store(root / "store.zarr", manifest, frames=2, tokens=encoder["tokens_per_frame"],
                       width=encoder["width"], encoder=encoder)
    run = root / "run"
    train(TrainConfig(**tiny_train_args(manifest, store, run, steps=30, summary_heads=4)))
    make_demo_corpus(root / "new", n_videos=1, seed=11)
    video = next((root / "new" / "videos").iterdir())
    return {"root": root, "manifest": manifest, "store": store, "run": run, "video": video}


def test_reference_answer_matches_the_question_as_the_manifest_asks_it():
    from trainer.web import reference_answer

    refs = [[{"role": "user", "content": "<video>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "And its shape?"}, {"role": "assistant", "content": "A circle."}]]
    assert reference_answer(refs, "what colour is it") == "Red."
    assert reference_answer(refs, "And its shape?") == "A circle."
    assert reference_answer(refs, "Red.") is None  # an answer is not a question
    assert reference_answer([], "What colour is it?") is None


def test_serve_flags_make_the_config():
    import run_train

    args = run_train.build_parser().parse_args(["serve", "--run", "r", "--compare", "r2", "--port", "8000"])
    from trainer.web import ServeConfig

    cfg = run_train._config(ServeConfig, args)
    assert (cfg.run, cfg.compare, cfg.host, cfg.port, cfg.store) == (Path("r"), Path("r2"), "127.0.0.1", 8000, None)


def test_serve_refuses_a_bad_run_in_one_line(tmp_path):
    import subprocess

    proc = subprocess.run([PYTHON, "run_train.py", "serve", "--run", str(tmp_path / "nope")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: no such run directory: {tmp_path / 'nope'}"]


def test_uploads_too_long_or_not_videos_are_refused_before_decoding(tiny, tmp_path):
    from trainer.errors import TrainerError
    from trainer.web import ServeConfig, WebChat

    chat = WebChat(ServeConfig(run=tiny["run"], max_video_seconds=0.5, device="cpu"))
    with pytest.raises(TrainerError, match=r"clip\.mp4: the video is \d+ s long; this server takes up to 0 s"):
        chat.file_video(tiny["video"], "clip.mp4")
    with pytest.raises(TrainerError, match=r"notes\.txt: not a video file"):
        chat.file_video(tiny["video"], "notes.txt")
    assert chat._encoder is None  # refused before the encoder is even loaded


def test_compared_runs_answer_side_by_side_as_each_alone(tiny, tmp_path):
    from trainer.chat import ChatConfig, GenerationFlags, open_chat
    from trainer.config import TrainConfig
    from trainer.train import train
    from trainer.web import ServeConfig, WebChat

    other = tmp_path / "other"
    train(TrainConfig(**tiny_train_args(tiny["manifest"], tiny["store"], other, steps=30, summary_heads=4, seed=1)))
    chat = WebChat(ServeConfig(run=tiny["run"], compare=other, device="cpu"))
    conv = chat.conversation(chat.row_video(0))
    flags = GenerationFlags(max_new_tokens=12)
    alone = [open_chat(ChatConfig(run=run, store=tiny["store"], row=0, max_new_tokens=12, device="cpu"))
             for run in (tiny["run"], other)]  # each run in its own terminal chat
    for question in (Q1, Q2):
        steps = list(chat.ask(conv, question, flags))
        assert [a.strip() for a in steps[-1]] == [s.answer(question) for s in alone]
        assert len({tuple(s) for s in steps}) > 2  # both grow, a piece at a time
    assert steps[-1][0].strip() != steps[-1][1].strip()  # two runs, two answers


# --- the page in a real browser ------------------------------------------------------------------


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no headless browser: needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver), which .ci/run installs")
    pytest.importorskip("gradio", reason="needs the [web] extra (pip install -e '.[web]')")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the [web] extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The served page as a user sees it, by the element ids `trainer.web.build_page` documents."""

    def __init__(self, driver) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.By = driver, By

    def css(self, selector: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, selector)

    def wait(self, condition, timeout: float = 30.0, what: str = "") -> object:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - the element is not there yet
                value = None
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; status: {self.status()!r}")

    def status(self) -> str:
        return " ".join(self.texts("#status"))

    def bot_messages(self, i: int = 0) -> list[str]:
        return self.texts(f"#answer-{i} .bot .message-content")

    def texts(self, selector: str) -> list[str]:
        """The text of every element matching ``selector``, read at one instant (the page
        replaces elements as the answer streams)."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText.trim())", selector)

    def pick(self, text: str) -> None:
        box = self.css("#row input")
        box.click()
        box.send_keys(text)
        self.wait(lambda: self.css("[role=option]"), what="the row list").click()

    def ask(self, question: str) -> list[str]:
        """Ask and return every distinct text the last answer showed while it streamed."""
        from selenium.webdriver.common.keys import Keys

        before = len(self.bot_messages())
        box = self.css("#question textarea")
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        seen: list[str] = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            texts = self.bot_messages()
            if len(texts) > before and (not seen or texts[-1] != seen[-1]):
                seen.append(texts[-1])
            if seen and self.status().startswith("Answered"):  # the page says the answer is complete
                texts = self.bot_messages()
                if texts[-1] != seen[-1]:
                    seen.append(texts[-1])
                return seen
            time.sleep(0.01)
        raise AssertionError(f"no complete answer to {question!r} in 30 s; seen {seen}, status {self.status()!r}")

    def upload(self, path: Path) -> None:
        self.css("#upload input[type=file]").send_keys(str(path))


def test_the_page_end_to_end(browser, tiny, monkeypatch):
    import importlib

    from trainer.chat import ChatConfig, open_chat
    from trainer.web import ServeConfig, start

    chat_module = importlib.import_module("trainer.chat")  # the package's `chat` is the function of that name
    prompts: list[list[int]] = []
    real = chat_module.stream_generate

    def spy(model, prompts_, *args, **kwargs):
        prompts.append(list(prompts_[0]))
        for step in real(model, prompts_, *args, **kwargs):
            time.sleep(STEP_S)
            yield step

    monkeypatch.setattr(chat_module, "stream_generate", spy)
    server = start(ServeConfig(run=tiny["run"], port=free_port(), device="cpu", threads=1, max_new_tokens=12,
                               max_upload_mb=0.5))
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])  # this server's upload folder
    try:
        assert server.url.startswith("http://127.0.0.1:")
        page = Page(browser)
        browser.get(server.url)
        # a cached row: the validation split is listed first
        entries = [json.loads(line) for line in (tiny["manifest"] / "videos.jsonl").read_text().splitlines()]
        first_val = min((e for e in entries if e["split"] == "val"), key=lambda e: e["row"])
        page.wait(lambda: page.css("#row input"), what="the page")
        page.pick(first_val["video_id"])
        page.wait(lambda: f"row {first_val['row']}" in page.status(), what="the row to be chosen")

        reference = open_chat(ChatConfig(run=tiny["run"], store=tiny["store"], row=first_val["row"],
                                          max_new_tokens=12, device="cpu"))
        with monkeypatch.context() as m:  # the reference answers, without the spy
            m.setattr(chat_module, "stream_generate", real)
            a1, a2 = reference.answer(Q1), reference.answer(Q2)
        assert a1 and a2

        seen = page.ask(Q1)
        assert seen[-1] == a1, seen
        growing = [s for s in seen[:-1] if s]
        assert len(growing) >= 2 and all(a1.startswith(s) for s in growing), seen  # streamed, piece by piece
        seen = page.ask(Q2)
        assert seen[-1] == a2 and page.bot_messages() == [a1, a2], seen
        # the model received both turns: the second prompt holds the first question and answer
        tok = reference.loaded.tok
        second = tok.decode([t for t in prompts[-1] if t != tok.video_id])
        assert second.index(Q1) < second.index(a1) < second.index(Q2), second
        assert page.css("#reference-answer textarea").get_attribute("value")  # the manifest asks Q1 of every video

        # an uploaded video that is not in the store, encoded as the store was
        page.upload(tiny["video"])
        page.wait(lambda: f"{tiny['video'].name} (uploaded)" in page.status(), what="the upload")
        assert page.bot_messages() == []  # a new conversation
        with monkeypatch.context() as m:
            m.setattr(chat_module, "stream_generate", real)
            expected = open_chat(ChatConfig(run=tiny["run"], video=tiny["video"], max_new_tokens=12,
                                            device="cpu")).answer(Q1)
        seen = page.ask(Q1)
        assert seen and seen[-1] == expected, seen
        assert not list(uploads.rglob(tiny["video"].name))  # deleted once encoded

        # a text file named .mp4: one line on the page, no stack trace
        bad = tiny["root"] / "notes.mp4"
        bad.write_text("hello, this is not a video\n")
        page.upload(bad)
        message = page.wait(lambda: "notes.mp4" in page.status() and page.status(), what="the error")
        assert message.startswith("Error: notes.mp4: unreadable container") and "Traceback" not in message
        assert "\n" not in message
        assert not list(uploads.rglob("notes.mp4"))

        # a file over --max-upload-mb: refused by Gradio before it is stored, said on the page
        big = tiny["root"] / "big.mp4"
        big.write_bytes(bytes(1 << 20))
        page.upload(big)
        page.wait(lambda: any('exceed the maximum allowed size' in t and 'big.mp4' in t for t in page.texts(".toast-body")),
                  what="the size message")
        assert not list(uploads.rglob("big.mp4"))
    finally:
        server.close()
    assert not uploads.exists()  # the server's upload folder goes with it
