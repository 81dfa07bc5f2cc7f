"""A server on a free loopback port, in a subprocess (the real ``edgellm serve``), over a kws-cnn package and a tiny
language model with a word-level tokenizer and a chat template."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

API_KEY = "test-key-123"
TEMPLATE = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}w5"


def add_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the tiny model's 256 ids ("<unk>", "<s>", "</s>", then "w3".."w255") and a chat template:
    text in and out without downloading a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}))
    return folder


@pytest.fixture(scope="session")
def chat_pkg(tmp_path_factory) -> Path:
    from edgellm import api
    from tests.llm.conftest import make_folder

    root = tmp_path_factory.mktemp("serve-lm")
    folder = add_tokenizer(make_folder("llama", root / "tiny-chat"))
    return api.build(str(folder), "host", root / "tiny-chat.edgepkg", weights="fp32").path


class Server:
    """``edgellm serve`` in a subprocess; ``url`` from its --json startup line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--port", "0", "--json", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"edgellm serve did not start: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.url = self.info["url"]

    def stop(self) -> str:
        """Ctrl-C (SIGINT): uvicorn shuts down cleanly and the command exits 0. Its stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture(scope="session")
def server(kws_pkg, chat_pkg):
    s = Server(f"kws={kws_pkg}", f"chat={chat_pkg}", "--api-key", API_KEY, "--threads", "1", "--max-body-mb", "1")
    yield s
    err = s.stop()
    assert s.proc.returncode == 0 and "Traceback" not in err, err
