"""Abuse check of `skyreels serve` (not CI): the attacks of the server review (issue 14), each
bounded in count and time and aimed only at a server this script starts on 127.0.0.1. For each
attack it reports the server's RSS before, at its peak during and after, and the latency of a good
request (a result GET) made every 50 ms during the attack.

Targets: no attack raises RSS by more than 64 MiB (the parallel decode bombs: 256 MiB), and a good
request stays under 100 ms.

Starts the server on the bundled tiny weights (binary from `cargo build --release -p skyreels-cli`
unless --bin) with an API key. Stdlib only. Linux (reads /proc).

Usage: python3 -m scripts.checks.abuse [--bin target/release/skyreels] [--only NAME ...]
"""
import argparse
import base64
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "wavespeed-ai/SkyReels-V1"
KEY = "abuse-check-key"
HOST = "127.0.0.1"
MIB = 1 << 20


def rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def threads(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def call(port, method, path, body=None, key=KEY, headers=None, timeout=30):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    h = {"Host": f"{HOST}:{port}"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    start = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        status = r.status
    finally:
        conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw
    return status, payload, time.perf_counter() - start


def png(width, height, rows=None):
    """An RGB PNG, all black, built row by row (a 8192x8192 one is ~200 KiB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp = zlib.compressobj(9)
    row = b"\0" + b"\0" * (3 * width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_uri(b):
    return "data:image/png;base64," + base64.b64encode(b).decode()


class Server:
    def __init__(self, binary, extra):
        self.tmp = tempfile.mkdtemp()
        self.log_path = Path(self.tmp) / "log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [binary, "serve", "--port", "0", "--api-key", KEY, "--output-dir", f"{self.tmp}/out"] + extra,
            stdout=self.log, stderr=self.log)
        self.port = None
        for _ in range(600):
            m = re.search(r"listening on http://[0-9.]+:(\d+)", self.log_path.read_text())
            if m:
                self.port = int(m.group(1))
                break
            time.sleep(0.1)
        assert self.port, self.log_path.read_text()
        while call(self.port, "GET", "/ready")[0] != 200:
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Probe:
    """RSS sampled every 10 ms and a good request every 50 ms while an attack runs."""

    def __init__(self, server, good_path):
        self.s, self.path = server, good_path
        self.stop = threading.Event()
        self.peak, self.lat = 0, []

    def __enter__(self):
        time.sleep(0.5)
        self.before = rss(self.s.proc.pid)
        self.peak = self.before
        self.threads = [threading.Thread(target=self._rss), threading.Thread(target=self._good)]
        for t in self.threads:
            t.start()
        return self

    def _rss(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss(self.s.proc.pid))
            time.sleep(0.01)

    def _good(self):
        while not self.stop.is_set():
            try:
                status, _, t = call(self.s.port, "GET", self.path, timeout=10)
                self.lat.append(t if status == 200 else float("inf"))
            except OSError:
                self.lat.append(float("inf"))
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()
        time.sleep(1.0)
        self.after = rss(self.s.proc.pid)


RESULTS = []


def report(name, probe, note, rss_budget=64 * MIB):
    lat = sorted(probe.lat) or [float("nan")]
    p50, worst = lat[len(lat) // 2] * 1000, lat[-1] * 1000
    grow = max(probe.peak, probe.after) - probe.before
    ok = grow <= rss_budget and worst <= 100
    line = (f"{name:<28} RSS {probe.before / MIB:6.1f} -> peak {probe.peak / MIB:6.1f} -> {probe.after / MIB:6.1f} MiB "
            f"(+{grow / MIB:5.1f}, budget {rss_budget // MIB}); good request p50 {p50:5.1f} ms, max {worst:6.1f} ms "
            f"({len(probe.lat)}); {'OK' if ok else 'OVER'}: {note}")
    print(line, flush=True)
    RESULTS.append((name, ok))


def parallel(n, f):
    out = [None] * n
    def run(i):
        try:
            out[i] = f(i)
        except Exception as e:  # noqa: BLE001 - an attack's failure is a result
            out[i] = e
    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def attack_methods(s, good):
    before = len(call(s.port, "GET", "/metrics", key=None)[1])
    with Probe(s, good) as p:
        for i in range(400):
            sock = socket.create_connection((HOST, s.port), timeout=10)
            sock.sendall(f"X{i}{'M' * 50000} / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            try:
                sock.recv(4096)
            except OSError:
                pass
            sock.close()
        after = len(call(s.port, "GET", "/metrics", key=None)[1])
    report("invented methods x400", p, f"/metrics {before} -> {after} bytes")


def attack_puts(s, good):
    def put(_):
        sock = socket.create_connection((HOST, s.port), timeout=30)
        sock.sendall(f"PUT /api/v3/media/uploads/invented HTTP/1.1\r\nHost: {HOST}\r\n"
                     f"Content-Length: {60 * MIB}\r\n\r\n".encode())
        sent, chunk = 0, b"\0" * MIB
        try:
            while sent < 60 * MIB:
                sock.sendall(chunk)
                sent += MIB
        except OSError:
            pass
        answer = b""
        try:
            answer = sock.recv(64)
        except OSError:
            pass
        sock.close()
        return sent, answer[:12]
    with Probe(s, good) as p:
        out = parallel(8, put)
    sent = [o[0] // MIB for o in out if isinstance(o, tuple)]
    answers = {o[1].decode(errors="replace") for o in out if isinstance(o, tuple)}
    report("8 x 60 MiB PUT, bad token", p, f"MiB the server let in before closing: {sent}, answers {answers}")


def attack_slow_headers(s, good):
    with Probe(s, good) as p:
        socks = []
        for _ in range(50):
            c = socket.create_connection((HOST, s.port), timeout=5)
            c.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n".encode())
            socks.append(c)
        time.sleep(15)
        still_open = 0
        for c in socks:
            c.settimeout(0.2)
            try:
                still_open += c.recv(1) != b""
            except socket.timeout:
                still_open += 1
            except OSError:
                pass
            c.close()
    report("50 unfinished headers", p, f"{still_open} of 50 still open after 15 s (header timeout 10 s)")


def attack_big_record(s, good):
    body = {"prompt": "FPS-24, p", "image": data_uri(png(64, 48)), "junk": "x" * int(7.6 * MIB)}
    with Probe(s, good) as p:
        status, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}", body)
        tid = v["data"]["id"]
        wait(s, tid)
    rec = Path(s.tmp) / "out" / "jobs" / f"{tid}.json"
    report("7.6 MiB unknown field", p, f"HTTP {status}, record {rec.stat().st_size} bytes")


def wait(s, tid, limit=120):
    end = time.time() + limit
    while time.time() < end:
        d = call(s.port, "GET", f"/api/v3/predictions/{tid}/result")[1]["data"]
        if d["status"] in ("completed", "failed", "cancelled"):
            return d
        time.sleep(0.1)
    raise TimeoutError(tid)


def attack_webhooks(s, good):
    small = data_uri(png(8, 8))
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png(8, 8) + f"\r\n--{boundary}--\r\n".encode()
    with Probe(s, good) as p:
        ids = []
        for i in range(600):
            # fails at once (refused image address), then its webhook is refused too
            status, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}?webhook=http://localhost:1/hook",
                                {"prompt": "p", "image": "http://localhost:2/x.png"})
            if status == 200:
                ids.append(v["data"]["id"])
            elif status == 429:
                time.sleep(0.05)
        peak_threads = threads(s.proc.pid)
        upload = []
        for _ in range(5):
            st, _, t = call(s.port, "POST", "/api/v3/media/upload/binary", form,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            upload.append(t * 1000)
        del small
    report("600 refused webhooks", p, f"{len(ids)} tasks, {peak_threads} threads after, "
           f"upload {min(upload):.1f}-{max(upload):.1f} ms")


def attack_xss(s, good):
    boundary = "b0undary"
    results = []
    with Probe(s, good) as p:
        for ct, data in [("text/html", b"<html><script>alert(1)</script>"),
                         ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")]:
            form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n"
                    f"Content-Type: {ct}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
            st, _, _ = call(s.port, "POST", "/api/v3/media/upload/binary", form,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            results.append(f"{ct} -> {st}")
    report("HTML/SVG uploads", p, ", ".join(results))


def attack_decode_bombs(s, good, side, name):
    bomb = data_uri(png(side, side))
    with Probe(s, good) as p:
        def one(_):
            st, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}", {"prompt": "p", "image": bomb})
            return wait(s, v["data"]["id"]) if st == 200 else st
        out = parallel(8, one)
    ends = sorted({(o["status"], o["code"]) if isinstance(o, dict) else str(o) for o in out})
    report(name, p, f"{len(bomb) // 1024} KiB data URIs; ends {ends}", rss_budget=256 * MIB)


def attack_cost(s, good):
    huge = {"prompt": "p", "image": data_uri(png(8, 8)), "width": 4096, "height": 4096, "num_frames": 257,
            "num_inference_steps": 100}
    with Probe(s, good) as p:
        st, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}", huge)
    report("4096x4096x257x100 task", p, f"HTTP {st}: {v['message'][:90]}...")


def attack_long_task(s, good):
    # the server runs with --max-task-seconds 1; 100 CFG steps of the tiny model take longer
    long = {"prompt": "p", "image": data_uri(png(96, 64)), "num_inference_steps": 100}
    with Probe(s, good) as p:
        st, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}", long)
        d = wait(s, v["data"]["id"])
    report("task past its time limit", p, f"{d['status']} {d['code']}: {d['error'][:70]}")


def attack_log_injection(s, good):
    forged = "2026-12-02T00:00:00.000000Z  INFO forged line"
    with Probe(s, good) as p:
        call(s.port, "GET", "/health", headers={"X-Request-Id": "x\x1b[31mred"})
        st, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}?webhook=http://localhost:1/%0D%0A{forged.replace(' ', '%20')}",
                        {"prompt": "p\r\n" + forged, "image": f"http://localhost:2/x\r\n{forged}"})
        if st == 200:
            wait(s, v["data"]["id"])
        time.sleep(0.5)
    forged_lines = [l for l in s.log_path.read_text().splitlines() if l.startswith("2026-12-02T00:00:00")]
    report("CR/LF in URLs and ids", p, f"{len(forged_lines)} forged log lines")


def attack_host(s, good):
    with Probe(s, good) as p:
        st, _, _ = call(s.port, "GET", "/api/v3/models", headers={"Host": "rebind.evil.example"})
    report("foreign Host header", p, f"HTTP {st}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/skyreels"))
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    s = Server(a.bin, ["--max-queue", "700", "--max-task-seconds", "1"])
    try:
        st, v, _ = call(s.port, "POST", f"/api/v3/{MODEL}", {"prompt": "FPS-24, good", "image": data_uri(png(96, 64))})
        good = f"/api/v3/predictions/{v['data']['id']}/result"
        wait(s, v["data"]["id"])
        attacks = {
            "methods": lambda: attack_methods(s, good),
            "puts": lambda: attack_puts(s, good),
            "headers": lambda: attack_slow_headers(s, good),
            "record": lambda: attack_big_record(s, good),
            "webhooks": lambda: attack_webhooks(s, good),
            "xss": lambda: attack_xss(s, good),
            "bombs": lambda: attack_decode_bombs(s, good, 8192, "8 x 8192^2 PNG bombs"),
            "bombs16": lambda: attack_decode_bombs(s, good, 4096, "8 x 4096^2 PNGs (the limit)"),
            "cost": lambda: attack_cost(s, good),
            "long": lambda: attack_long_task(s, good),
            "logs": lambda: attack_log_injection(s, good),
            "host": lambda: attack_host(s, good),
        }
        for name, run in attacks.items():
            if not a.only or name in a.only:
                run()
    finally:
        s.stop()
    over = [n for n, ok in RESULTS if not ok]
    print("all within the targets" if not over else f"over the targets: {over}")


if __name__ == "__main__":
    main()
