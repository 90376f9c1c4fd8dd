"""The Redis-mode attacks of the scale-out review (issue 26), on loopback against a built binary
on the bundled tiny weights, with what each costs now (docs/scale-out.md lists the figures before
and after; docs/serving.md has the single-node attacks of scripts/abuse_check.py).

Usage: python3 -m scripts.checks.abuse_cluster [--bin target/release/skyreels]

Starts Redis (Debian's redis-server), one API node (`serve --redis --workers 0`) and one worker,
then: 48 parallel keyless GETs of a 12 MiB upload (Redis used_memory growth, a keyed poll's
latency meanwhile); a ~200-byte submit of a 1x1 PNG at 4096x4096 (bytes its queued input takes
in Redis); 1,025 upload tickets opened with one key (can another key still open one?); a hung
Redis (SIGSTOP: how long a poll waits); a forged 8192x8192 queue entry (run or refused?);
Redis at maxmemory (what a submit answers). Every process is started here and stopped by PID;
every loop is bounded. Stdlib Python only.
"""
import argparse
import base64
import concurrent.futures
import json
import os
import re
import signal
import tempfile
import threading
import time

from scripts.common.nodes import MODEL, Nodes, noise_png

KEY, OTHER = "abuse-key", "abuse-other-key"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/skyreels")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="abuse-cluster-")
    n = Nodes(os.path.abspath(args.bin), "redis-server", work, KEY)
    rows = []
    try:
        n.start_redis()
        n.start_serve("a", "--redis", n.redis_url(), "--workers", "0", "--api-key", OTHER)
        n.start_worker("w1")
        n.wait_ready("a")
        base = n.base("a")

        def mem():
            return int(re.search(r"used_memory:(\d+)", n.redis("INFO", "memory")).group(1))

        # 1. upload GET flood
        path = os.path.join(work, "noise.png")
        data = noise_png(path, 3500)
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"n.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        import urllib.request
        req = urllib.request.Request(f"{base}/api/v3/media/upload/binary", data=body, method="POST", headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            url = json.loads(r.read())["data"]["download_url"]
        before, peak, done = mem(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], mem())
                time.sleep(0.02)
        t = threading.Thread(target=sample)
        t.start()
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            gets = pool.map(lambda _: n.get(url, auth=False)[0], range(48))
            time.sleep(0.5)
            t0 = time.time()
            code, _ = n.get(f"{base}/api/v3/predictions/{'0' * 32}/result")
            poll = time.time() - t0
            codes = set(gets)
        done.set()
        t.join()
        rows.append(("48 parallel keyless GETs of a 12 MiB upload",
                     f"Redis +{(peak[0] - before) / 2**20:.1f} MiB, GETs {sorted(codes)}, a keyed poll {code} in {poll * 1000:.0f} ms"))

        # 2. a tiny submit asking for 4096x4096, queued while no worker runs (then cancelled)
        n.stop("w1")
        one = base64.b64encode(noise_png(os.path.join(work, "one.png"), 1)).decode()
        big = n.submit("a", {"prompt": "p", "image": f"data:image/png;base64,{one}", "width": 4096,
                             "height": 4096, "num_frames": 1, "num_inference_steps": 1, "seed": 1})
        size = 0
        for _ in range(100):
            size = int(n.redis("MEMORY", "USAGE", f"skyreels:input:{big}") or 0)
            if size:
                break
            time.sleep(0.05)
        n.get(f"{base}/api/v3/predictions/{big}", method="DELETE")
        rows.append(("a 1x1 PNG submitted at 4096x4096 (its queued input)", f"{size} bytes in Redis"))
        n.start_worker("w2")
        n.wait_ready("a")

        # 3. tickets: one key opens 1,025; can another key still open one?
        refused = None
        for k in range(1025):
            code, b = n.get(f"{base}/api/v3/media/uploads", method="POST",
                            body=json.dumps({"filename": "a.png", "size": 10}).encode())
            if code != 200:
                refused = (k, code)
                break
        req = urllib.request.Request(f"{base}/api/v3/media/uploads", method="POST",
                                     data=json.dumps({"filename": "a.png", "size": 10}).encode(),
                                     headers={"Authorization": f"Bearer {OTHER}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            other = r.status
        ttl = n.redis("PTTL", f"skyreels:tickets:{n.redis('--scan', '--pattern', 'skyreels:tickets:*').split()[0].split(':')[-1]}")
        rows.append(("1,025 upload tickets opened with one key",
                     f"refused from ticket {refused[0] + 1} ({refused[1]}) on; another key: {other}; unused ones expire within {-(-int(ttl) // 60000)} min"
                     if refused else "all opened"))

        # 4. a hung Redis
        n.procs["redis"].send_signal(signal.SIGSTOP)
        t0 = time.time()
        try:
            code, _ = n.get(f"{base}/api/v3/predictions/{'0' * 32}/result")
        finally:
            n.procs["redis"].send_signal(signal.SIGCONT)
        rows.append(("Redis hung (SIGSTOP), one result poll", f"{code} after {time.time() - t0:.2f} s"))

        # 5. a forged 8192x8192 queue entry
        tid = "e" * 32
        n.forge_task(tid, base)
        d = n.result("a", tid)
        for _ in range(600):
            d = n.result("a", tid, unavailable_for=5)
            if d["status"] in ("completed", "failed"):
                break
            time.sleep(0.1)
        rows.append(("a forged 8192x8192 queue entry", f"{d['status']} {d['code']}: {d['error'][:60]}..."))

        # 6. Redis at maxmemory
        n.redis("CONFIG", "SET", "maxmemory", "1")
        try:
            code, b = n.get(f"{base}/api/v3/{MODEL}", method="POST",
                            body=json.dumps({"prompt": "p", "image": f"data:image/png;base64,{one}"}).encode())
        finally:
            n.redis("CONFIG", "SET", "maxmemory", "0")
        rows.append(("a submit while Redis is at maxmemory", f"{code}: {json.loads(b)['message'][:60]}..."))
        n.stop_all()
    finally:
        n.kill_all()
    print("| attack | now |\n|---|---|")
    for a, r in rows:
        print(f"| {a} | {r} |")


if __name__ == "__main__":
    main()
