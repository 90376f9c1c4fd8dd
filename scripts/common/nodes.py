"""Processes of a live skyreels deployment on loopback, for the cluster test
(tests/cluster/cluster_test.py), benchmark (scripts.bench.cluster) and abuse check
(scripts.checks.abuse_cluster): Redis (AOF on, fsync always), API nodes and workers, each started
here and stopped by its PID. Stdlib only."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

MODEL = "wavespeed-ai/SkyReels-V1"


def noise_png(path, side):
    """Writes an incompressible grey PNG of side x side pixels (stored, not deflated); its bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + os.urandom(side) for _ in range(side))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return png


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    def __init__(self, binary, redis_server, work, key):
        self.bin, self.redis_server, self.work, self.key = binary, redis_server, work, key
        self.procs = {}
        self.apis = {}
        self.worker_metrics = {}
        self.redis_port = free_port()
        self.redis_dir = os.path.join(work, "redis")
        os.makedirs(work, exist_ok=True)

    def redis_url(self, db=0):
        return f"redis://127.0.0.1:{self.redis_port}/{db}"

    def start(self, name, cmd):
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def log_of(self, name):
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
            return f.read()

    def stop(self, name, sig=signal.SIGTERM, clean=True):
        p = self.procs.pop(name)
        p.send_signal(sig)
        rc = p.wait(timeout=60)
        if clean and rc != 0:
            sys.exit(f"{name} exited with {rc} on {sig.name}:\n{self.log_of(name)[-3000:]}")

    def stop_all(self):
        for name in [n for n in self.procs if n != "redis"]:
            self.stop(name)
        if "redis" in self.procs:
            self.stop("redis")

    def kill_all(self):
        for p in self.procs.values():
            p.kill()

    def start_redis(self):
        os.makedirs(self.redis_dir, exist_ok=True)
        self.start("redis", [self.redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                             "--dir", self.redis_dir, "--appendonly", "yes", "--appendfsync", "always",
                             "--save", "", "--daemonize", "no"])
        for _ in range(100):
            if self.redis("PING") == "PONG":
                return
            time.sleep(0.1)
        sys.exit("redis did not start")

    def redis(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.redis_port), *args], capture_output=True, text=True)
        return r.stdout.strip()

    def redis_hash(self, key):
        """A hash of single-line values (compact JSON)."""
        flat = self.redis("HGETALL", key).split("\n")
        return dict(zip(flat[0::2], flat[1::2]))

    def task_field(self, task_id, field):
        return self.redis("HGET", f"skyreels:task:{task_id}", field)

    def start_serve(self, name, *flags):
        """`skyreels serve` on a fresh port (kept across restarts of the same name)."""
        port = self.apis.setdefault(name, free_port())
        self.start(f"api-{name}", [self.bin, "serve", "--port", str(port), "--api-key", self.key,
                                   "--output-dir", os.path.join(self.work, f"api-{name}"), *flags])

    def start_worker(self, name, *flags):
        self.worker_metrics[name] = free_port()
        self.start(name, [self.bin, "worker", "--redis", self.redis_url(),
                          "--metrics-port", str(self.worker_metrics[name]),
                          "--output-dir", os.path.join(self.work, name), *flags])

    def base(self, name):
        return f"http://127.0.0.1:{self.apis[name]}"

    def get(self, url, auth=True, method="GET", body=None):
        req = urllib.request.Request(url, method=method, data=body)
        if auth:
            req.add_header("Authorization", f"Bearer {self.key}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def submit(self, name, fields):
        code, body = self.get(f"{self.base(name)}/api/v3/{MODEL}", method="POST", body=json.dumps(fields).encode())
        assert code == 200, (code, body)
        return json.loads(body)["data"]["id"]

    def result(self, name, task_id, unavailable_for=0.0):
        """The prediction; a 503 (Redis unreachable) is retried for `unavailable_for` seconds."""
        deadline = time.time() + unavailable_for
        while True:
            code, body = self.get(f"{self.base(name)}/api/v3/predictions/{task_id}/result")
            if code != 503 or time.time() >= deadline:
                break
            time.sleep(0.1)
        assert code == 200, (code, body)
        return json.loads(body)["data"]

    def forge_task(self, task_id, base_url):
        """Writes a task straight into Redis and its queue, as anyone who can reach Redis could:
        an 8192x8192 text request the API would refuse."""
        record = {"id": task_id, "model": MODEL, "status": "created", "input": {}, "base_url": base_url,
                  "created_at": int(time.time() * 1000), "started_at": None, "completed_at": None,
                  "error": "", "code": 0, "seed": 1, "outputs": [], "base64_output": False,
                  "webhook": None, "step": 0, "total_steps": 4, "timings": []}
        request = {"model": MODEL, "prompt": "forged", "negative_prompt": None, "image": False,
                   "height": 8192, "width": 8192, "num_frames": 9, "steps": 4, "guidance_scale": 6.0,
                   "embedded_guidance_scale": 1.0, "seed": 1, "fps": 24.0, "cache": "none"}
        self.redis("HSET", f"skyreels:task:{task_id}", "record", json.dumps(record), "status", "created",
                   "step", "0", "total", "4", "attempts", "0", "model", MODEL, "enqueued", "1")
        self.redis("HSET", f"skyreels:input:{task_id}", "request", json.dumps(request), "image", "")
        self.redis("ZADD", "skyreels:waiting", "999999", task_id)
        self.redis("XADD", f"skyreels:queue:{MODEL}", "*", "id", task_id)

    def wait_ready(self, name, log=None):
        for _ in range(600):
            try:
                if self.get(self.base(name) + "/ready", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit(f"{name} never became ready:\n{self.log_of(log or 'api-' + name)[-3000:]}")
