"""decord imported before torch (issue 12, environment hazards): decord2 preloads NVBLAS with
RTLD_GLOBAL, and a torch loaded after it dies in its first CPU matrix product. Every package of
the project, and `load_encoder`, import torch safely first (`torch_guard.py`); checked in
fresh interpreters that import decord first, against tokens computed here (torch imported
first, by conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.encoder import EncoderSpec, load_encoder

ROOT = Path(__file__).resolve().parents[1]
FRAMES = "np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)"
ENCODE = ("from pipeline.encoder import EncoderSpec, load_encoder\n"
          f"tokens = load_encoder(EncoderSpec('demo-tiny', 'none')).encode({FRAMES})\n"
          "sys.stdout.buffer.write(tokens.tobytes())\n")


FIRSTS = ["import decord", "import decord; import model", "import decord; import trainer"]
DECODE_FIRST = "decode then encode"


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys\nimport numpy as np\n" + code], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every fresh interpreter of this module, started together (each imports torch for seconds;
    they are independent processes) and waited for: its exit status, stdout and stderr."""
    from manifests.video_writer import write_video

    path = write_video(tmp_path_factory.mktemp("guard") / "v.mp4",
                       (np.full((48, 64, 3), i * 40, np.uint8) for i in range(5)), 25)
    # the project's own order in `chat`-like code: a decode (decord) before the first encode
    decode = ("from pipeline.decode import DecodeSpec, decode_video\n"
              f"decode_video({str(path)!r}, DecodeSpec(2, 'uniform', 96))\n"
              "assert 'decord' in sys.modules and 'torch' not in sys.modules\n")
    codes = {**{first: first + "\n" + ENCODE for first in FIRSTS}, DECODE_FIRST: decode + ENCODE}
    procs = {name: _start(code) for name, code in codes.items()}
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    return done


@pytest.fixture(scope="module")
def reference() -> bytes:
    return load_encoder(EncoderSpec("demo-tiny", "none")).encode(eval(FRAMES)).tobytes()  # noqa: S307 - our literal


@pytest.mark.parametrize("first", FIRSTS)
def test_decord_imported_first_then_the_project_encodes_the_same_tokens(first, runs, reference):
    proc = runs[first]
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == reference


def test_the_project_decodes_then_encodes_in_one_process(runs, reference):
    """The project's own order in `chat`-like code: a decode (decord) before the first encode."""
    proc = runs[DECODE_FIRST]
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == reference
