"""`chexdist bench app`: `chexdist app` in its own process on a free 127.0.0.1 port, loaded by
concurrent clients uploading real images (predict and Grad-CAM alternating), then the memory check.

Load: `clients` threads x `requests` each, every client on its own keep-alive connection. Reports
p50/p95/p99 latency, throughput and errors (any non-200). Memory: the server's RSS and peak RSS
(VmHWM) after the load, then after `memory_requests` more requests; RSS must not grow with the
request count (the Grad-CAM hook leak this guards against grows it by the activations of every
request; the server's /healthz also counts the hooks left on the model, which must be 0). Finally SIGTERM, and the server must exit 0 (clean shutdown). Everything is bounded: a
request times out after `timeout_s`, the server start after `start_timeout_s`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from chexdist.errors import ChexdistError

ENDPOINTS = ("/api/predict", "/api/cam")


def multipart(path: Path, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a form upload of `path` as field `file`."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in (fields or {}).items()]
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    body = b"".join(parts) + head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def server_memory(pid: int) -> dict[str, float]:
    """The process's RSS and peak RSS (VmHWM) in MiB, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0
    return {"rss_mb": values.get("VmRSS", float("nan")), "peak_rss_mb": values.get("VmHWM", float("nan"))}


@contextmanager
def running_app(run: str | os.PathLike, *, port: int | None = None, workers: int = 1, start_timeout_s: float = 180.0,
                extra: tuple[str, ...] = ()) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python -m chexdist app --run RUN` on a free port until /healthz answers; SIGTERM on exit
    (the process's exit code is then in `proc.returncode`)."""
    from chexdist.training.launcher import free_port

    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="chexdist-app-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "chexdist", "app", "--run", str(run), "--port", str(port), "--quiet",
           "--workers", str(workers), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + start_timeout_s
        while not healthy(port):
            if proc.poll() is not None:
                log.seek(0)
                tail = " | ".join(log.read().strip().splitlines()[-3:])
                raise ChexdistError(f"chexdist app exited with {proc.returncode} before answering /healthz: {tail}")
            if time.monotonic() > deadline:
                raise ChexdistError(f"chexdist app did not answer /healthz within {start_timeout_s:.0f}s")
            time.sleep(0.2)  # polling a starting process, bounded by the deadline
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _client(port: int, bodies: list[tuple[str, bytes, str]], start: int, count: int, timeout_s: float) -> list[tuple[str, float, int]]:
    """`count` requests on one keep-alive connection: (endpoint, seconds, status) each."""
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        for i in range(start, start + count):
            endpoint, body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", endpoint, body=body, headers={"Content-Type": ctype})
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                status = 0
            out.append((endpoint, time.perf_counter() - t0, status))
    finally:
        conn.close()
    return out


def load(port: int, bodies: list[tuple[str, bytes, str]], clients: int, requests: int, timeout_s: float) -> dict[str, Any]:
    """`clients` concurrent clients x `requests` each: latency percentiles, throughput, errors."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        done = list(pool.map(lambda c: _client(port, bodies, c * requests, requests, timeout_s), range(clients)))
    wall = time.perf_counter() - t0
    rows = [r for client in done for r in client]
    ms = np.array([s for _, s, _ in rows]) * 1000.0
    by = {e: np.array([s for ep, s, _ in rows if ep == e]) * 1000.0 for e in ENDPOINTS}
    return {
        "requests": len(rows),
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
        **{f"{e.rsplit('/', 1)[1]}_p50_ms": float(np.percentile(v, 50)) for e, v in by.items() if v.size},
        "throughput_rps": len(rows) / wall,
        "errors": sum(1 for *_, status in rows if status != 200),
        "seconds": wall,
    }


def request_bodies(images: list[Path]) -> list[tuple[str, bytes, str]]:
    """predict and cam of each image, alternating."""
    bodies = []
    for path in images:
        for endpoint in ENDPOINTS:
            body, ctype = multipart(path)
            bodies.append((endpoint, body, ctype))
    return bodies


def app_suite(run: str | None = None, images: str | None = None, clients: int = 32, requests: int = 4,
              memory_requests: int = 500, count: int = 16, workers: int = 1, timeout_s: float = 300.0) -> Iterator[dict[str, Any]]:
    from chexdist.bench.fixtures import find_images

    if run is None or images is None:
        raise ChexdistError("bench app needs --run runs/NAME (e.g. a demo's run) and --images DIR (real X-rays)")
    if not (1 <= clients <= 256 and 1 <= requests <= 1000 and 0 <= memory_requests <= 10000):
        raise ChexdistError("bench app: --clients 1..256, --requests 1..1000, --memory-requests 0..10000")
    files = find_images(images)[:count]
    bodies = request_bodies(files)
    arch = json.loads((Path(run) / "best.json").read_text()).get("arch")
    with running_app(run, workers=workers) as (proc, port):
        load(port, bodies, 1, len(bodies), timeout_s)  # warm-up: every image through both endpoints once
        result = {"bench": "app", "arch": arch, "clients": clients, "per_client": requests, "workers": workers,
                  "images": len(files), **load(port, bodies, clients, requests, timeout_s)}
        before = server_memory(proc.pid)
        memory = load(port, bodies, min(4, clients), max(1, memory_requests // min(4, clients)), timeout_s) if memory_requests else None
        after = server_memory(proc.pid)
        hooks = health(port).get("model_hooks")
    result.update({
        "rss_mb_before": before["rss_mb"], "peak_rss_mb_before": before["peak_rss_mb"],
        "memory_requests": memory["requests"] if memory else 0, "memory_errors": memory["errors"] if memory else 0,
        "rss_mb_after": after["rss_mb"], "peak_rss_mb_after": after["peak_rss_mb"],
        "rss_growth_mb": after["rss_mb"] - before["rss_mb"],
        "model_hooks_after": hooks,
        "shutdown_exit_code": proc.returncode,
    })
    yield result
