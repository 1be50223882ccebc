"""Security properties as tests: nothing is unpickled, no remote code runs unless asked for, the server never
turns a request into a path, request sizes are bounded, and the API key is compared in constant time.

The pickle payloads below would create a marker file when unpickled; every test asserts the marker is absent.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import re
import shutil
import socket
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src" / "slimtune"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory):
    from tiny_chat import build_tiny_chat

    return build_tiny_chat(tmp_path_factory.mktemp("sec"), {"alpha": 1})


# ---- weights only from safetensors ----------------------------------------------------------------------------------
def test_a_pickle_next_to_an_adapter_is_never_loaded(tmp_path: Path, chat) -> None:
    from transformers import AutoModelForCausalLM

    from slimtune import PeftModel

    marker = tmp_path / "pwned"
    adapter = shutil.copytree(chat.adapters["alpha"], tmp_path / "adapter")
    for name in ("adapter_model.bin", "pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        _write_pickle(adapter / name, marker)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat.base), adapter)
    assert model.active_adapters == ["default"]
    (adapter / "adapter_model.safetensors").unlink()  # only the pickle is left: refused by name
    with pytest.raises(ValueError, match="adapter_model.bin.*never unpickles"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat.base), adapter)
    assert not marker.exists()


def test_a_pickle_in_a_checkpoint_is_never_executed(tmp_path: Path, baseline: Path) -> None:
    from slimtune.train import checkpoint as ckpt_mod

    marker = tmp_path / "pwned"
    run = shutil.copytree(baseline / "checkpoints" / "step-2", tmp_path / "step-2")
    for name in ("optimizer.pt", "rng.pt", "scheduler.pt"):
        saved = (run / name).read_bytes()
        _write_pickle(run / name, marker)
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the point is that nothing ran
            ckpt_mod._load(run / name, "cpu")
        (run / name).write_bytes(saved)
    assert not marker.exists()


def test_inference_loads_base_weights_only_from_safetensors(tmp_path: Path, chat) -> None:
    from slimtune.infer import load_for_inference

    marker = tmp_path / "pwned"
    base = shutil.copytree(chat.base, tmp_path / "base")
    (base / "model.safetensors").unlink()
    _write_pickle(base / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="cannot load"):
        load_for_inference(base, device="cpu")
    assert not marker.exists()


def test_training_refuses_a_pickled_base_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slimtune.train.methods import load_base_model

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    (base / "model.safetensors").unlink()
    torch.save(model.state_dict(), base / "pytorch_model.bin")  # a benign pickle: is it read at all?
    with pytest.raises((ValueError, OSError)):
        load_base_model(str(base), "lora", torch.float32, None, torch.device("cpu"))


# ---- trust_remote_code ----------------------------------------------------------------------------------------------
def _from_pretrained_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("from_pretrained", "from_config"):
                calls.append((str(file.relative_to(SRC)), node.lineno, node))
    return calls


OURS = {"PeftModel", "PeftConfig", "cls"}
"""Receivers of from_pretrained that are slimtune's own (adapter folders: no code to run)."""


def test_every_from_pretrained_call_passes_trust_remote_code_false() -> None:
    calls = [c for c in _from_pretrained_calls() if ast.unparse(c[2].func.value) not in OURS]
    assert len(calls) >= 11
    for file, line, call in calls:
        flags = [kw.value for kw in call.keywords if kw.arg == "trust_remote_code"]
        assert len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value is False, \
            f"{file}:{line}: {ast.unparse(call)} does not pass trust_remote_code=False"
    assert "trust_remote_code=True" not in "".join(p.read_text() for p in SRC.rglob("*.py"))


def _remote_code_model(folder: Path, base: Path, marker: Path) -> Path:
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-remote"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import LlamaConfig as EvilConfig, "
                                    "LlamaForCausalLM as EvilModel\n")
    return folder


def test_a_model_asking_for_remote_code_does_not_run_it(tmp_path: Path, chat, tiny_model_dir: Path) -> None:
    from slimtune.infer import load_for_inference
    from slimtune.quant import load_model
    from slimtune.train.methods import load_base_model

    marker = tmp_path / "pwned"
    infer_dir = _remote_code_model(tmp_path / "remote-infer", chat.base, marker)
    with pytest.raises(Exception):  # noqa: B017 - transformers refuses (unknown model_type); nothing runs
        load_for_inference(infer_dir, device="cpu")
    train_dir = _remote_code_model(tmp_path / "remote-train", tiny_model_dir, marker)
    with pytest.raises(Exception):  # noqa: B017
        load_base_model(str(train_dir), "lora", torch.float32, None, torch.device("cpu"))
    with pytest.raises(Exception):  # noqa: B017
        load_model(train_dir, compute_dtype=torch.float32, device="cpu")
    assert not marker.exists()


def _remote_code_tokenizer(folder: Path, base: Path, marker: Path, tokenizer_class: str | None) -> Path:
    """A model folder whose tokenizer_config.json maps AutoTokenizer to planted code that creates `marker`."""
    shutil.copytree(base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return folder


def _on_a_terminal(argv: list[str], answer: bytes = b"y\n", timeout: float = 120) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal, typing `answer` at every prompt."""
    import pty
    import select
    import subprocess
    import time

    from reliability_tools import ROOT, cli_env

    main, child = pty.openpty()
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=cli_env(), cwd=str(ROOT),
                            close_fds=True)
    os.close(child)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if b"[y/N]" in chunk or b"y/N" in chunk:
                    os.write(main, answer)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    return code, re.sub(r"\x1b\[[0-9;]*m", "", out.decode(errors="replace"))  # without the colours


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "EvilTokenizer", None])
@pytest.mark.parametrize("command", ["train", "data-inspect", "chat"])
def test_planted_tokenizer_code_never_runs_on_a_terminal(tmp_path: Path, tiny_model_dir: Path, tiny_rows: Path,
                                                         tokenizer_class: str | None, command: str) -> None:
    """transformers asks "run the custom code? [y/N]" on a terminal when trust_remote_code is not passed; a
    `y` would run it. Every call passes False, and the folder is refused with one line naming auto_map."""
    import sys

    from reliability_tools import FAULT_STATS, write_run_config

    marker = tmp_path / "pwned"
    model = _remote_code_tokenizer(tmp_path / "model", tiny_model_dir, marker, tokenizer_class)
    config = write_run_config(tmp_path, model, tiny_rows, tmp_path / "run", max_steps=1)
    args = {"train": ["train", str(config), "--no-progress"], "data-inspect": ["data", "inspect", str(config)],
            "chat": ["chat", "--model", str(model)]}[command]
    code, output = _on_a_terminal([sys.executable, "-m", "slimtune", *args])
    assert not marker.exists(), output
    assert code == 2, output
    assert "Traceback" not in output and "[y/N]" not in output, output
    assert "tokenizer_config.json: auto_map" in output and "never runs code from a model folder" in output, output
    FAULT_STATS["remote_code_on_a_terminal_refused"] = int(FAULT_STATS.get("remote_code_on_a_terminal_refused",
                                                                           0)) + 1


# ---- the server ------------------------------------------------------------------------------------------------------
KEY = "security-key-12345"


@pytest.fixture(scope="module")
def server(chat):
    from slimtune.infer import load_for_inference
    from slimtune.infer.serve import ServeConfig, Server

    loaded = load_for_inference(chat.base, adapters=chat.adapters, device="cpu")
    srv = Server(loaded, ServeConfig(port=0, api_key=KEY, max_body_bytes=10_000, max_tokens_limit=4,
                                     default_max_tokens=2, batch_wait_ms=0)).start()
    yield srv
    srv.close()


def _post(server, body: dict | bytes, key: str | None = KEY, length: str | None = None) -> tuple[int, dict]:
    import http.client

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Connection: close",
            f"Content-Length: {length or len(data)}"] + ([f"Authorization: Bearer {key}"] if key else [])
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if length else data))
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_adapter_names_are_never_paths(server, tmp_path: Path) -> None:
    from slimtune.infer.loading import parse_adapter_args

    for bad in ("../evil=/tmp", "a/b=/tmp", "/abs=/tmp", "..=/tmp", ".hidden=/tmp", "x" * 65 + "=/tmp", "=/tmp"):
        with pytest.raises(ValueError, match="not allowed"):
            parse_adapter_args([bad])
    before = dict(server.loaded.adapters)
    for model in ("../alpha", "alpha/../alpha", str(server.loaded.adapters["alpha"]), "/etc/passwd",
                  "..\\..\\windows", "alpha\x00"):
        status, body = _post(server, {"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and body["error"]["code"] == "model_not_found", model
    assert server.loaded.adapters == before


def test_request_size_is_bounded_and_oversized_bodies_are_never_read(server) -> None:
    status, body = _post(server, b"", length=str(10**12))  # no body is sent: the answer must not wait for it
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _post(server, {"model": "alpha", "messages": [{"role": "user", "content": "x" * 20_000}]})
    assert status == 413
    status, body = _post(server, {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 10**6})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_api_key_is_compared_in_constant_time(server, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtune.infer.serve import server as server_mod

    source = inspect.getsource(server_mod.Server.check_auth)
    assert "hmac.compare_digest" in source
    tree = ast.parse(textwrap.dedent(source))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and "key" in ast.unparse(n)
                and any(isinstance(op, ast.Eq | ast.NotEq) for op in n.ops)], "the key is compared with =="
    seen: list[tuple[bytes, bytes]] = []
    real = server_mod.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server_mod.hmac, "compare_digest", spy)
    ok = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert _post(server, ok)[0] == 200
    for wrong in (None, KEY[:-1], KEY + "x", KEY.upper(), "", "Bearer " + KEY):
        status, body = _post(server, ok, key=wrong)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", wrong
    assert len(seen) == 7 and all(b == KEY.encode() for _, b in seen)
