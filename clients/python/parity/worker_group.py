"""A 2-rank CPU worker group of real ``moe-worker`` processes on loopback, serving a checkpoint
through the forward API (``--traffic api``), with its control API for load, placement, status
and remaps. Used by parity.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open until all are chosen)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


class GroupError(RuntimeError):
    pass


class WorkerGroup:
    """``ranks`` moe-worker processes (one rank each) forming one group on 127.0.0.1.

    Rank r listens on ``http_ports[r]`` (control: status, load, placement, remap) and
    ``forward_ports[r]`` (the forward API), as the operator deploys them (separate ports)."""

    def __init__(self, worker_bin: str, weights: Path, workdir: Path, ranks: int = 2,
                 client_token: str = "parity-client-token", control_token: str = "parity-control-token",
                 extra_env: dict[str, str] | None = None):
        self.worker_bin, self.weights, self.workdir, self.ranks = worker_bin, weights, workdir, ranks
        self.client_token, self.control_token = client_token, control_token
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "client-token").write_text(client_token + "\n")
        (workdir / "control-token").write_text(control_token + "\n")
        ports = free_ports(1 + 2 * ranks)
        self.comm_port = ports[0]
        self.http_ports = ports[1:1 + ranks]
        self.forward_ports = ports[1 + ranks:]
        self.extra_env = extra_env or {}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def forward_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.forward_ports]

    def control_url(self, rank: int) -> str:
        return f"http://127.0.0.1:{self.http_ports[rank]}"

    def start(self, ready_timeout: float = 60.0) -> None:
        for rank in range(self.ranks):
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "RUST_LOG": os.environ.get("RUST_LOG", "info"),
                "MOE_RANK": str(rank),
                "MOE_WORLD_SIZE": str(self.ranks),
                "MOE_LEADER_ADDR": f"127.0.0.1:{self.comm_port}",
                "MOE_COMM_PORT": str(self.comm_port if rank == 0 else 0),
                "MOE_HTTP_PORT": str(self.http_ports[rank]),
                "MOE_FORWARD_PORT": str(self.forward_ports[rank]),
                "MOE_ADVERTISE_ADDR": "127.0.0.1",
                "MOE_BACKEND": "cpu",
                "MOE_TRAFFIC": "api",
                "MOE_WEIGHTS": str(self.weights),
                "MOE_CLIENT_TOKEN_FILE": str(self.workdir / "client-token"),
                "MOE_CONTROL_TOKEN_FILE": str(self.workdir / "control-token"),
                "MOE_RENDEZVOUS_TIMEOUT_SECONDS": "60",
                "MOE_COMM_TIMEOUT_SECONDS": "30",
                **self.extra_env,
            }
            log = self.workdir / f"rank-{rank}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen([self.worker_bin], env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + ready_timeout
        for rank in range(self.ranks):
            while True:
                code = self.procs[rank].poll()
                if code is not None:
                    raise GroupError(f"rank {rank} exited with code {code} before it was ready:\n{self.tail(rank)}")
                try:
                    with urllib.request.urlopen(self.control_url(rank) + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise GroupError(f"rank {rank} not ready after {ready_timeout:g} s:\n{self.tail(rank)}")
                time.sleep(0.05)

    def tail(self, rank: int, lines: int = 30) -> str:
        try:
            text = self.logs[rank].read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"  rank {rank} | {line}" for line in text[-lines:])

    def stop(self) -> list[int]:
        """SIGTERM every rank (the group stops cleanly, exit 0), then wait; exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    # -- control API ----------------------------------------------------------------------------

    def get(self, rank: int, path: str):
        with urllib.request.urlopen(self.control_url(rank) + path, timeout=10) as r:
            return json.loads(r.read())

    def remap(self, rank: int, placement: dict, mode: str = "async") -> tuple[int, dict]:
        body = json.dumps({"placement": placement, "layers": [], "mode": mode}).encode()
        req = urllib.request.Request(
            self.control_url(rank) + "/v1/remap", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.control_token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
