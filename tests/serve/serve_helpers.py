"""Helpers of the HTTP API tests: a tiny checkpoint that has a tokenizer and a chat template,
``meshnode serve`` as a process, and a bounded wait for a condition."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.mesh.mesh_helpers import write_tiny_checkpoint

#: seconds ``meshnode serve`` may take to join the mesh and load the head
SERVE_START_TIMEOUT = 120.0
LISTENING = re.compile(r"listening on (http://[\d.]+:\d+)")
WORKER_METRICS = re.compile(r"metrics on (http://[\d.]+:\d+/metrics)")
#: a ChatML template, as SmolLM2's
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<unk>", "<|im_start|>", "<|im_end|>")


def write_tiny_chat_checkpoint(folder: Path, seed: int = 0) -> Path:
    """The tiny random Llama of the mesh tests (vocabulary 128) with a character-level
    tokenizer over that vocabulary, ChatML specials and chat template, EOS ``<|im_end|>``."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    write_tiny_checkpoint(folder, seed)
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    words = list(SPECIALS) + chars
    words += [f"<x{i}>" for i in range(128 - len(words))]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "unk_token": "<unk>",
    }))
    return folder


def metrics_url(node) -> str:
    """Where a worker started with ``--metrics-port`` serves its metrics (from its output)."""

    def found() -> str | None:
        for path in (node.folder / "stdout.log", node.log_path):
            match = WORKER_METRICS.search(path.read_text(errors="replace")) if path.exists() \
                else None
            if match:
                return match.group(1)
        return None

    return str(wait_until(found, 30, f"metrics of {node.name} announced"))


def scrape(url: str, key: str | None = None) -> dict[tuple, float]:
    """Every sample at ``url`` (sent with the bearer ``key``, if any), parsed by
    prometheus_client, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(authorized(url, key), timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> object:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f} s")
        time.sleep(interval)


class ServeProcess:
    """``python -m meshnode serve ...`` (or ``twistd -n meshnode serve``) on an ephemeral port."""

    def __init__(self, folder: Path, args: list[str], twistd: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = folder / "serve.log"
        if twistd:
            command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                       "-n", f"--pidfile={folder / 'twistd.pid'}", "--logfile=-",
                       "meshnode", "serve"]
        else:
            command = [sys.executable, "-m", "meshnode", "serve"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p)
        env.setdefault("JAX_PLATFORMS", "cpu")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                command + ["--port", "0", *args], cwd=folder, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.url = ""

    def wait_ready(self) -> str:
        def listening() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"meshnode serve exited:\n{self.tail()}")
            match = LISTENING.search(self.log.read_text(errors="replace"))
            return match.group(1) if match else None

        self.url = str(wait_until(listening, SERVE_START_TIMEOUT, "listening"))
        return self.url

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str, key: str | None = None) -> bytes:
        with urllib.request.urlopen(authorized(self.url + path, key), timeout=30) as response:
            return response.read()

    def get_json(self, path: str, key: str | None = None) -> dict:
        return json.loads(self.get(path, key))


def authorized(url: str, key: str | None) -> urllib.request.Request:
    """A GET of ``url`` with ``Authorization: Bearer key`` when a key is given."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return urllib.request.Request(url, headers=headers)
