"""A fork server for the kill/resume test: import slimtune's CLI, torch and transformers once, then fork one
child per launch that runs the real `slimtune` entry point (`slimtune.cli.main:main`) with the given argv.

Each child is an ordinary OS process: the test kills it with SIGKILL by pid, exactly as kill -9 would. Forking
from a warm parent skips ~4-5 s of imports per launch on 2 CPU cores, which is what keeps 20+ launches inside
the CI budget. No torch op runs in the parent before a fork (OMP_NUM_THREADS=1), so children start clean.

Protocol (one JSON object per line on stdin, one answer per line on stdout):
  {"op": "run", "argv": [...], "stderr": PATH}  -> {"pid": N}
  {"op": "wait", "pid": N}                      -> {"code": exit code, negative for a signal}
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _warm_up() -> None:
    import matplotlib  # noqa: F401 - the loss plot of a finished run
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import slimtune.cli.main  # noqa: F401
    import slimtune.data  # noqa: F401
    import slimtune.train.loop  # noqa: F401
    import slimtune.train.run  # noqa: F401


def _child(argv: list[str], stderr_path: str) -> None:
    code = 1
    try:
        out = os.open(os.devnull, os.O_WRONLY)
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["slimtune", *argv]
        from slimtune.cli.main import main

        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then leave without running the parent's cleanup
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            pid = os.fork()
            if pid == 0:
                _child(request["argv"], request["stderr"])
            print(json.dumps({"pid": pid}), flush=True)
        elif request["op"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
