"""Worker entry points for the process-pool and Ray tests of vpeft bench (kept light: the crashing and hanging workers
import nothing of vpeft)."""

from __future__ import annotations

import os


def crash_or_run(spec: dict, out_dir: str, threads: int, verbose: bool) -> None:
    """The run labelled 'crash' dies hard (like a segfault or an OOM kill); the others run normally."""
    if spec["method_label"] == "crash":
        os._exit(3)
    from vpeft.bench.runner import _worker_main

    _worker_main(spec, out_dir, threads, verbose)


def hang_or_run(spec: dict, out_dir: str, threads: int, verbose: bool) -> None:
    """The run labelled 'hang' never ends and shrugs off SIGTERM, like a wedged run, and so does the child process it
    starts (a stand-in for a data-loader worker; it writes its pid to ``child.pid``); any other run starts such a
    child too, publishes the record the test prepared for it (a fast successful run) and exits, leaving the child
    behind."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    os.setpgrp()  # as vpeft's own worker entry point does
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if spec["method_label"] == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(out_dir, "child.pid").write_text(str(child.pid))
    if spec["method_label"] != "hang":  # finishes, leaving its child behind
        os.replace(Path(out_dir, "prepared.json"), Path(out_dir, "record.json"))
        return
    with open(Path(out_dir) / "log.txt", "w") as log:
        log.write("waiting for a data loader that never answers\n")
    time.sleep(600)


def hang_or_run_ray(spec: dict, out_dir: str, threads: int, started=None) -> dict:
    """Ray task body: the run labelled 'hang' reports its start and never ends; any other run returns the record the
    test prepared for it."""
    import json
    import time
    from pathlib import Path

    if spec["method_label"] != "hang":
        return json.loads(Path(out_dir, "prepared.json").read_text())
    started.put_nowait(f"{spec['method_label']}/{spec['task']}/seed{spec['seed']}")
    time.sleep(600)
    return {}


def sleep_with_child(spec: dict, out_dir: str, threads: int, verbose: bool) -> None:
    """A run that never ends, with a child process (a stand-in for a data-loader worker); it becomes a process group
    leader with the driver watchdog, as vpeft's own worker entry point does, and writes ``[its pid, the child's]``
    to ``pids.json``."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from vpeft.bench.runner import _own_group

    _own_group()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(out_dir, "pids.tmp")
    tmp.write_text(json.dumps([os.getpid(), child.pid]))
    os.replace(tmp, Path(out_dir, "pids.json"))
    time.sleep(600)


def stall_after_checkpoint(spec: dict, out_dir: str, threads: int, verbose: bool) -> None:
    """vpeft's own worker, which stalls for good right after writing the checkpoint of epoch ``$STALL_AT_EPOCH``
    (touching ``$STALL_MARKER``), so that a test can kill the driver at a known point of a real training."""
    import time
    from pathlib import Path

    import vpeft.train.checkpoint as ckpt
    import vpeft.train.engine as engine
    from vpeft.bench.runner import _worker_main

    stall = int(os.environ.get("STALL_AT_EPOCH", "0"))
    real = ckpt.write_checkpoint

    def write_then_stall(path, payload):
        real(path, payload)
        if payload["epoch"] == stall:
            Path(os.environ["STALL_MARKER"]).touch()
            time.sleep(600)

    engine.ckpt.write_checkpoint = write_then_stall
    _worker_main(spec, out_dir, threads, verbose)
