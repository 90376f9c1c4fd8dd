"""Benchmark of the scale-out mode on the bundled tiny weights (docs/scale-out.md, "Tests and benchmark").

Usage: python3 -m scripts.bench.cluster [--bin target/debug/skyreels] [--tasks 24] [--latency 200]
                                         [--kills 3]

Measures, for the in-memory engine (`skyreels serve --device cpu` / `cpu:0,cpu:1`) and the Redis
engine (Redis + one `serve --redis --workers 0` + one or two `skyreels worker`):
- tasks per minute with 1 and 2 workers (--tasks submitted at once, first submit to last
  completion);
- submit latency (async POST, --latency tasks) and result GET latency (1,000 GETs), p50 and p99;
- the time from a worker's SIGKILL to its task running on another worker (--kills trials,
  --claim-timeout 3 s; the default timeout is 30 s, the takeover follows it).
Each run also checks that no task was lost or completed twice. Needs redis-server and redis-cli
(scripts/test_cluster.sh installs them) and a built binary; stdlib Python only.
"""
import argparse
import base64
import os
import re
import signal
import statistics
import tempfile
import time

from scripts.common.nodes import Nodes

KEY = "bench-key"
LONG = {"num_inference_steps": 100, "num_frames": 65}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(xs):
    return f"{pct(xs, 50) * 1000:.1f} / {pct(xs, 99) * 1000:.1f}"


def wait_all(n, node, ids, limit=600):
    deadline = time.time() + limit
    left = set(ids)
    while left and time.time() < deadline:
        for i in list(left):
            d = n.result(node, i)
            if d["status"] in ("completed", "failed", "cancelled"):
                assert d["status"] == "completed", d
                left.discard(i)
        time.sleep(0.05)
    assert not left, f"{len(left)} tasks did not finish"
    return time.time()


def completions(n, ids):
    """Outcome lines per task in every log: each task must have exactly one."""
    logs = ""
    for f in os.listdir(n.work):
        if f.endswith(".log") and f != "redis.log":
            with open(os.path.join(n.work, f), errors="replace") as fh:
                logs += fh.read()
    counts = {i: len(re.findall(rf"task finished id={i} status=\"completed\"", logs)) for i in ids}
    bad = {i: c for i, c in counts.items() if c != 1}
    assert not bad, f"tasks not completed exactly once: {bad}"


def deployment(args, engine, workers, work):
    n = Nodes(args.bin, "redis-server", work, KEY)
    if engine == "memory":
        devices = ",".join(f"cpu:{i}" for i in range(workers)) if workers > 1 else "cpu"
        n.start_serve("a", "--device", devices, "--max-queue", "1000")
    else:
        n.start_redis()
        n.start_serve("a", "--redis", n.redis_url(), "--workers", "0", "--max-queue", "1000",
                      "--claim-timeout", "3")
        for w in range(workers):
            n.start_worker(f"w{w + 1}", "--claim-timeout", "3")
    n.wait_ready("a")
    return n


def run(args, engine, workers, fields):
    with tempfile.TemporaryDirectory() as work:
        n = deployment(args, engine, workers, work)
        try:
            # throughput: every task submitted at once
            t0 = time.time()
            ids = [n.submit("a", {**fields, "seed": k}) for k in range(args.tasks)]
            t1 = wait_all(n, "a", ids)
            per_min = args.tasks / (t1 - t0) * 60
            row = {"tasks/min": per_min}
            if workers == 2:
                # latency: submits (the queue running meanwhile), then result GETs
                lat = []
                more = []
                for k in range(args.latency):
                    s = time.perf_counter()
                    more.append(n.submit("a", {**fields, "seed": 1000 + k}))
                    lat.append(time.perf_counter() - s)
                wait_all(n, "a", more)
                gets = []
                for _ in range(1000):
                    s = time.perf_counter()
                    n.result("a", ids[0])
                    gets.append(time.perf_counter() - s)
                row["submit"] = lat
                row["get"] = gets
                ids += more
            completions(n, ids)
            if engine == "redis" and workers == 2 and args.kills:
                takeovers = []
                for k in range(args.kills):
                    tid = n.submit("a", {**fields, **LONG, "seed": 5000 + k})
                    while not (n.task_field(tid, "status") == "processing" and int(n.task_field(tid, "step") or 0) >= 1):
                        time.sleep(0.01)
                    victim = n.task_field(tid, "worker")
                    pid = int(victim.rsplit("-", 3)[1])
                    name = next(w for w, p in n.procs.items() if p.pid == pid)
                    n.stop(name, signal.SIGKILL, clean=False)
                    killed = time.time()
                    while not (n.task_field(tid, "attempts") == "2" and n.task_field(tid, "worker") != victim):
                        assert time.time() - killed < 60
                        time.sleep(0.01)
                    takeovers.append(time.time() - killed)
                    n.start_worker(f"{name}-{k}", "--claim-timeout", "3")
                    wait_all(n, "a", [tid])
                row["takeover"] = takeovers
            n.stop_all()
            return row
        finally:
            n.kill_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/debug/skyreels")
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--latency", type=int, default=200)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--image", default="weights/example.png")
    args = ap.parse_args()
    with open(args.image, "rb") as f:
        image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    fields = {"prompt": "FPS-24, a sunny meadow", "image": image}
    rows = {}
    for engine in ("memory", "redis"):
        for workers in (1, 2):
            rows[(engine, workers)] = run(args, engine, workers, fields)
            print(f"{engine}, {workers} worker(s): {rows[(engine, workers)]['tasks/min']:.0f} tasks/min", flush=True)
    print()
    print("| engine | tasks/min, 1 worker | tasks/min, 2 workers | submit p50 / p99 (ms) | result GET p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for engine in ("memory", "redis"):
        one, two = rows[(engine, 1)], rows[(engine, 2)]
        print(f"| {engine} | {one['tasks/min']:.0f} | {two['tasks/min']:.0f} | {ms(two['submit'])} | {ms(two['get'])} |")
    t = rows[("redis", 2)].get("takeover")
    if t:
        print(f"\nSIGKILL to running on another worker (--claim-timeout 3): {statistics.mean(t):.2f} s mean, "
              f"{max(t):.2f} s max over {len(t)} kills")
    ratio = pct(rows[("redis", 2)]["get"], 99) / pct(rows[("memory", 2)]["get"], 99)
    print(f"result GET p99, Redis / in-memory: {ratio:.2f}x; no task lost or completed twice")


if __name__ == "__main__":
    main()
