r"""Starts N copies of a command as the processes of one multi-process JAX job on this machine.

    python tools/launch_local.py --processes 2 [--devices-per-process 1] [--port 0] [--grace 20] -- \
        python -m vljax.train --config=configs/merlin.py:tiny --workdir=/tmp/run --distributed

For testing the multi-host code paths (per-host input slices, checkpoints written by every process,
logs and results by process 0 alone) without a pod. Each copy gets, in its environment:

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT   the coordinator (process 0 serves it), read by
                                           jax.distributed.initialize()
  VLJAX_NUM_PROCESSES=N, VLJAX_PROCESS_ID=k which `--distributed` passes to it
  XLA_FLAGS=... --xla_force_host_platform_device_count=D   D CPU devices per process

Output lines are prefixed with `[k]`. When one copy exits with an error or is killed, the others are
stopped after `--grace` seconds (a peer that lost its partner would otherwise wait for it up to
jax's heartbeat timeout; on CPU jax aborts it sooner). Each failure is reported as it is seen. The
exit status is 0 when every copy exited 0, else the first failing copy's (128 + signal number for a
signal; copies that fail within the same 0.1 s poll count in process order). SIGTERM and SIGINT are
passed on to every copy (a preemption: the trainer saves a checkpoint and exits 0).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, processes: int, port: int, devices: int) -> dict:
    """The environment of copy `process_id`: the coordinator, the process geometry and its CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", VLJAX_NUM_PROCESSES=str(processes),
                VLJAX_PROCESS_ID=str(process_id), XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
                PYTHONUNBUFFERED="1")


def _pump(k: int, stream, out, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[{k}] {line}")
            out.flush()


def launch(command: list[str], processes: int, *, devices: int = 1, port: int = 0, grace: float = 20.0,
           out=sys.stdout) -> int:
    """Runs the copies to the end; returns the exit status described in the module docstring."""
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for k in range(processes):
        env = process_env(os.environ, process_id=k, processes=processes, port=port, devices=devices)
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group: a signal to it reaches its workers
        procs.append(p)
        with lock:
            out.write(f"[launch_local] process {k} of {processes}: pid {p.pid}, coordinator 127.0.0.1:{port}\n")
            out.flush()
        pumps.append(threading.Thread(target=_pump, args=(k, p.stdout, out, lock), daemon=True))
        pumps[-1].start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure, failed_at, reported = None, None, set()
    try:
        while any(p.poll() is None for p in procs):
            for k, p in enumerate(procs):
                if p.poll() not in (None, 0) and k not in reported:
                    reported.add(k)
                    if first_failure is None:
                        first_failure, failed_at = k, time.monotonic()
                    with lock:
                        out.write(f"[launch_local] process {k} exited with {_status(p.returncode)}; stopping the "
                                  f"others in {grace:g} s unless they end first\n")
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    for k, p in enumerate(procs):  # failures the loop did not see (every copy ended before a poll)
        if p.returncode != 0 and k not in reported:
            out.write(f"[launch_local] process {k} exited with {_status(p.returncode)}\n")
            first_failure = k if first_failure is None else first_failure
    if first_failure is None:
        return 0
    rc = procs[first_failure].returncode
    return 128 - rc if rc < 0 else rc


def _status(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: launch_local.py --processes N [options] -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--grace", type=float, default=20.0,
                        help="seconds the others may run on after one copy failed")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.processes < 1 or args.devices_per_process < 1 or not command:
        parser.error("--processes and --devices-per-process must be >= 1, and a command must follow --")
    return launch(command, args.processes, devices=args.devices_per_process, port=args.port, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
