"""Load check of `skyreels serve` (not CI): result-route and submit latency under concurrent
polling while a job runs, no accepted job lost when submits exceed the queue, and the server's
RSS before and after (bounded loops, loopback only; scripts/checks/abuse.py runs the attacks).

Starts the server on the bundled tiny weights (binary from `cargo build --release -p skyreels-cli`
unless --bin), with a small queue. Stdlib only.

Usage: python3 -m scripts.checks.load [--bin target/release/skyreels] [--pollers 32] [--seconds 10]
       [--submits 40] [--max-queue 8]
"""
import argparse
import base64
import json
import re
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "wavespeed-ai/SkyReels-V1"


def call(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as e:
        payload = json.loads(e.read() or b"null")
        status = e.code
    return status, payload, time.perf_counter() - start


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/skyreels"))
    ap.add_argument("--pollers", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--submits", type=int, default=40)
    ap.add_argument("--max-queue", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    log = open(f"{tmp}/log", "w+")
    server = subprocess.Popen([a.bin, "serve", "--port", "0", "--output-dir", f"{tmp}/out",
                               "--max-queue", str(a.max_queue)], stdout=log, stderr=log)
    try:
        base = None
        for _ in range(600):
            m = re.search(r"listening on (http://[0-9.:]+)", Path(f"{tmp}/log").read_text())
            if m:
                base = m.group(1)
                break
            time.sleep(0.1)
        while call("GET", f"{base}/ready")[0] != 200:
            time.sleep(0.1)
        rss_before = rss_mib(server.pid)
        image = "data:image/png;base64," + base64.b64encode((ROOT / "weights/example.png").read_bytes()).decode()
        # a long job: many steps and frames on the tiny model
        long_job = {"prompt": "FPS-24, load", "image": image, "num_inference_steps": 100, "num_frames": 97,
                "width": 384, "height": 256}
        s, v, _ = call("POST", f"{base}/api/v3/{MODEL}", long_job)
        job = v["data"]["id"]
        lat, stop = [], time.time() + a.seconds
        lock = threading.Lock()

        def poll():
            mine = []
            while time.time() < stop:
                s, _, t = call("GET", f"{base}/api/v3/predictions/{job}/result")
                assert s == 200, s
                mine.append(t)
            with lock:
                lat.extend(mine)

        threads = [threading.Thread(target=poll) for _ in range(a.pollers)]
        for t in threads:
            t.start()
        # meanwhile, more submits than the queue holds
        accepted, rejected, submit_lat = [], 0, []
        small = {"prompt": "FPS-24, q", "image": image}
        for _ in range(a.submits):
            s, v, t = call("POST", f"{base}/api/v3/{MODEL}", small)
            submit_lat.append(t)
            if s == 200:
                accepted.append(v["data"]["id"])
            else:
                assert s == 429, (s, v)
                rejected += 1
        for t in threads:
            t.join()
        status = call("GET", f"{base}/api/v3/predictions/{job}/result")[1]["data"]
        print(f"result route: {len(lat)} polls by {a.pollers} clients in {a.seconds:.0f} s while a job ran "
              f"(at the end: {status['status']}, step {status['progress']['step']}/{status['progress']['total']}): "
              f"p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat) * 1000:.2f} ms")
        print(f"submit: {len(submit_lat)} submits: p50 {pct(submit_lat, 50):.2f} ms, p99 {pct(submit_lat, 99):.2f} ms; "
              f"{len(accepted)} accepted, {rejected} refused with 429 (queue {a.max_queue})")
        ends = {}
        for jid in [job] + accepted:
            while True:
                d = call("GET", f"{base}/api/v3/predictions/{jid}/result")[1]["data"]
                if d["status"] in ("completed", "failed", "cancelled"):
                    ends[d["status"]] = ends.get(d["status"], 0) + 1
                    break
                time.sleep(0.2)
        print(f"accepted jobs' final states: {ends} (of {1 + len(accepted)} accepted)")
        assert ends == {"completed": 1 + len(accepted)}, "an accepted job was lost or failed"
        print("no accepted job lost")
        time.sleep(1)
        print(f"server RSS: {rss_before:.1f} MiB before the load, {rss_mib(server.pid):.1f} MiB after")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
