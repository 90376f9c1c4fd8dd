"""A live Redis deployment on the tiny weights, driven by the official WaveSpeed Python SDK
(run by scripts/test_cluster.sh).

Usage (from the repository root, in a venv with the wavespeed SDK):
  python -m tests.cluster.cluster_test SKYREELS_BIN REDIS_SERVER IMAGE WORKDIR

Starts Redis (AOF on, fsync always) on a free loopback port, two API nodes (`serve --redis
--workers 0`) and two worker processes (`skyreels worker`), then checks: an upload made on node
A is used in a submit on node B; 12 tasks submitted alternately to A and B and polled on the
other node all complete exactly once, while the worker running the long one is killed with
SIGKILL (the task completes on the other worker, attempts = 2); a cancel sent to B stops a task
submitted on A while it runs; sync mode; each webhook arrives once; restarting an API node loses
nothing; stopping and restarting Redis loses no accepted task (submits meanwhile get 503 in the
envelope); /metrics on every node and on the workers' metrics ports; 48 parallel keyless GETs of
a 12 MiB upload keep Redis' memory within a bound while a keyed poll on that node still answers;
a hung Redis (SIGSTOP) gets 503 within the command timeout; a forged queue entry is refused by
the worker; a full Redis gets its own 503. Every process is started here and stopped by its PID.
"""
import base64
import concurrent.futures
import http.server
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from scripts.common.nodes import MODEL, Nodes, noise_png

BIN, REDIS_SERVER, IMAGE, WORK = sys.argv[1:5]
KEY = "cluster-test-key"
os.environ["WAVESPEED_API_KEY"] = KEY  # read at import
import wavespeed  # noqa: E402

CLAIM = "3"
LONG = {"num_inference_steps": 100, "num_frames": 65}
N = Nodes(BIN, REDIS_SERVER, WORK, KEY)
PROCS, APIS, WORKER_METRICS = N.procs, N.apis, N.worker_metrics
REDIS_PORT = N.redis_port
start, stop, log_of, get, base = N.start, N.stop, N.log_of, N.get, N.base
start_redis, redis, redis_hash, task_field = N.start_redis, N.redis, N.redis_hash, N.task_field


def start_api(name):
    N.start_serve(name, "--redis", N.redis_url(), "--workers", "0", "--claim-timeout", CLAIM,
                  "--allow-private-image-urls")


def start_worker(name):
    N.start_worker(name, "--claim-timeout", CLAIM, "--allow-private-image-urls")


def clients_for(node):
    return wavespeed.Client(api_key=KEY, base_url=base(node))


wait_ready = N.wait_ready


result = N.result


def wait_done(node, ids, limit=240):
    """Polls the tasks on `node` with the SDK's get_result until each has ended."""
    deadline = time.time() + limit
    done = {}
    client = clients_for(node)
    while time.time() < deadline and len(done) < len(ids):
        for i in ids:
            if i not in done:
                d = client.get_result(i)["data"]
                if d["status"] in ("completed", "failed", "cancelled"):
                    done[i] = d
        time.sleep(0.2)
    missing = [i for i in ids if i not in done]
    assert not missing, f"not finished within {limit} s: {missing}"
    return done


def wait_running(task_id, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        if task_field(task_id, "status") == "processing" and int(task_field(task_id, "step") or 0) >= 1:
            return task_field(task_id, "worker")
        time.sleep(0.02)
    sys.exit(f"task {task_id} never ran")


def finished_lines(task_id):
    """How many times any worker stored an outcome for the task (the log line of the winner)."""
    return sum(len(re.findall(rf"task finished id={task_id} ", log_of(w))) for w in WORKER_METRICS)


def new_worker():
    name = f"w{len(WORKER_METRICS) + 1}"
    start_worker(name)
    return name


def kill_runner(task_id):
    """SIGKILLs the worker process running the task; its consumer name and the kill time."""
    victim = wait_running(task_id)
    pid = int(victim.rsplit("-", 3)[1])
    name = next(n for n, p in PROCS.items() if p.pid == pid)
    assert name in WORKER_METRICS, (victim, name)
    stop(name, signal.SIGKILL, clean=False)
    return victim, name, time.time()


def check_once(done):
    for i, d in done.items():
        assert d["status"] == "completed", (i, d["status"], d["error"])
        assert finished_lines(i) == 1, f"task {i} ended {finished_lines(i)} times"


def used_memory():
    info = redis("INFO", "memory")
    return int(re.search(r"used_memory:(\d+)", info).group(1))


def upload_flood(ca):
    """48 parallel keyless GETs of a 12 MiB upload on node A: Redis' memory stays within 64 MiB
    of where it was (each node reads at most 4 windows of 1 MiB at once; before, every GET made
    Redis build the whole value as a reply), and a keyed poll on A meanwhile still answers."""
    path = os.path.join(WORK, "noise.png")
    noise_png(path, 3500)
    url = ca.upload(path)
    size = os.path.getsize(path)
    base_mem, peak, stop_sampling = used_memory(), [0], threading.Event()

    def sample():
        while not stop_sampling.is_set():
            peak[0] = max(peak[0], used_memory())
            time.sleep(0.02)

    def fetch(_):
        code, body = get(url, auth=False)
        return code, len(body)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        gets = pool.map(fetch, range(48))
        time.sleep(0.5)
        poll_start = time.time()
        code, _ = get(f"{base('a')}/api/v3/predictions/{'0' * 32}/result")
        poll = time.time() - poll_start
        got = list(gets)
    stop_sampling.set()
    sampler.join()
    assert all(g == (200, size) for g in got), set(got)
    assert code == 404, f"a keyed poll during the flood got {code}"
    grew = (peak[0] - base_mem) / 2**20
    assert grew < 64, f"Redis grew by {grew:.0f} MiB serving 48 GETs of a {size >> 20} MiB upload"
    print(f"upload flood: 48 GETs of {size / 2**20:.1f} MiB in {time.time() - t0:.1f} s; Redis grew "
          f"{grew:.1f} MiB (bound 64); a keyed poll answered in {poll:.2f} s")


def hung_redis():
    """SIGSTOP: Redis keeps its sockets and answers nothing; a poll gets 503 within the
    command timeout (2.5 s; checked against 8 s), not after 20-40 s."""
    PROCS["redis"].send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        code, body = get(f"{base('a')}/api/v3/predictions/{'0' * 32}/result")
        took = time.time() - t0
    finally:
        PROCS["redis"].send_signal(signal.SIGCONT)
    assert code == 503 and json.loads(body)["code"] == 503, (code, body)
    assert took < 8, f"a hung Redis held the poll {took:.1f} s"
    print(f"hung Redis: 503 after {took:.2f} s")


def forged_entry(client):
    """A task written straight into Redis, as anyone who can reach it could: the worker checks
    it against the API's rules and fails it (1401) instead of running it."""
    tid = "f" * 32
    N.forge_task(tid, base("a"))
    d = wait_done("b", [tid])[tid]
    assert d["status"] == "failed" and d["code"] == 1401 and "height" in d["error"], d
    print(f"forged queue entry: refused by the worker ({d['error'][:70]}...)")


def full_redis():
    """Redis at maxmemory (noeviction refuses writes): a submit gets 503 saying Redis is full."""
    redis("CONFIG", "SET", "maxmemory", "1")
    try:
        code, body = get(f"{base('a')}/api/v3/{MODEL}", method="POST",
                         body=json.dumps({"prompt": "p", "image": "data:image/png;base64,AA=="}).encode())
    finally:
        redis("CONFIG", "SET", "maxmemory", "0")
    env = json.loads(body)
    assert code == 503 and "is full" in env["message"], (code, env)
    print(f"full Redis: 503 ({env['message'][:60]}...)")


class Hooks(http.server.BaseHTTPRequestHandler):
    seen = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Hooks.seen[body["id"]] = Hooks.seen.get(body["id"], 0) + 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def main():
    os.makedirs(WORK, exist_ok=True)
    with open(IMAGE, "rb") as f:
        image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    prompt = "FPS-24, a sunny meadow"
    start_redis()
    for n in ("a", "b"):
        start_api(n)
    for _ in range(2):
        new_worker()
    wait_ready("a")
    wait_ready("b")
    ca = wavespeed.Client(api_key=KEY, base_url=base("a"))
    cb = wavespeed.Client(api_key=KEY, base_url=base("b"))
    clients = {"a": ca, "b": cb}

    # an upload made on A, submitted on B, polled and downloaded on A
    url = ca.upload(IMAGE)
    assert url.startswith(base("a")), url
    tid, _ = cb._submit(MODEL, {"prompt": prompt, "image": url, "num_frames": 5})
    d = wait_done("a", [tid])[tid]
    assert d["status"] == "completed", d
    out = d["outputs"][0].replace(base("b"), base("a"))
    code, mp4 = get(out, auth=False)
    assert code == 200 and mp4[4:8] == b"ftyp", (code, mp4[:16])
    print("upload on A, submit on B, output from A: ok")

    # sync mode through a node that runs no worker
    out = cb.run(MODEL, {"prompt": prompt, "image": image, "seed": 4}, enable_sync_mode=True, timeout=120)
    assert out["outputs"], out
    print("sync mode: ok")

    # 12 tasks alternating nodes, each polled on the other; the worker of the long one dies
    ids, node_of = [], {}
    for k in range(12):
        node = "ab"[k % 2]
        extra = LONG if k == 2 else {}
        i, _ = clients[node]._submit(MODEL, {"prompt": prompt, "image": image, "seed": k, **extra})
        ids.append(i)
        node_of[i] = node
    long_id = ids[2]
    victim, name, killed_at = kill_runner(long_id)
    print(f"killed {name} while it ran {long_id} at step {task_field(long_id, 'step')}")
    # the task runs again elsewhere within the claim timeout (plus a poll)
    while task_field(long_id, "attempts") != "2" or task_field(long_id, "worker") == victim:
        assert time.time() - killed_at < 30, "the killed worker's task was not taken over"
        time.sleep(0.05)
    print(f"taken over after {time.time() - killed_at:.1f} s")
    done = {}
    for node in "ab":
        other = "b" if node == "a" else "a"
        done.update(wait_done(other, [i for i in ids if node_of[i] == node]))
    check_once(done)
    assert task_field(long_id, "attempts") == "2", task_field(long_id, "attempts")
    # the second attempt's own file (the killed worker's could never overwrite it), from node A
    out = done[long_id]["outputs"][0]
    assert out.endswith(f"/outputs/{long_id}-2.mp4"), out
    code, mp4 = get(out.replace(base(node_of[long_id]), base("a")), auth=False)
    assert code == 200 and mp4[4:8] == b"ftyp", (code, mp4[:16])
    assert all(task_field(i, "attempts") == "1" for i in ids if i != long_id)
    print("12 tasks: each completed once; the killed worker's task on attempt 2")
    new_worker()

    # a cancel on B stops a task submitted on A while it runs
    cid, _ = ca._submit(MODEL, {"prompt": prompt, "image": image, **LONG})
    wait_running(cid)
    code, body = get(f"{base('b')}/api/v3/predictions/{cid}", method="DELETE")
    assert code == 200, (code, body)
    d = wait_done("a", [cid])[cid]
    assert d["status"] == "cancelled" and d["progress"]["step"] < d["progress"]["total"], d
    print(f"cancel on B stopped A's task at step {d['progress']['step']}")

    # webhooks: each terminal state delivered once
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    hids = [clients["ab"[k]]._submit(MODEL, {"prompt": prompt, "image": image, "webhook_url": hook})[0]
            for k in range(2)]
    wait_done("a", hids)
    deadline = time.time() + 30
    while time.time() < deadline and sorted(Hooks.seen) != sorted(hids):
        time.sleep(0.1)
    time.sleep(1)
    assert Hooks.seen == {h: 1 for h in hids}, Hooks.seen
    hooks.shutdown()
    print("webhooks: one delivery per task")

    # restarting an API node loses nothing
    stop("api-a")
    more = [cb._submit(MODEL, {"prompt": prompt, "image": image, "seed": 50 + k})[0] for k in range(3)]
    start_api("a")
    wait_ready("a")
    check_once(wait_done("a", ids + more))
    print("API node restarted: every task still answered")

    # Redis stopped and started again: no accepted task lost; submits meanwhile get 503
    rid, _ = ca._submit(MODEL, {"prompt": prompt, "image": image, **LONG})
    queued = [cb._submit(MODEL, {"prompt": prompt, "image": image, "seed": 70 + k})[0] for k in range(2)]
    wait_running(rid)
    stop("redis")
    req = urllib.request.Request(f"{base('a')}/api/v3/{MODEL}", method="POST",
                                 data=json.dumps({"prompt": prompt, "image": image}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    t0 = time.time()
    try:
        urllib.request.urlopen(req, timeout=30)
        sys.exit("a submit succeeded while Redis was down")
    except urllib.error.HTTPError as e:
        env = json.loads(e.read())
        assert e.code == 503 and env["code"] == 503 and env["data"] is None, (e.code, env)
    assert time.time() - t0 < 20, "the 503 took too long"
    code, _ = get(f"{base('b')}/api/v3/predictions/{rid}/result")
    assert code == 503, code
    time.sleep(2)
    start_redis()
    back = time.time()
    result("b", rid, unavailable_for=10)
    print(f"node B answers {time.time() - back:.2f} s after Redis is back")
    check_once(wait_done("b", [rid] + queued))
    print(f"Redis restarted: the running task (attempts {task_field(rid, 'attempts')}) and the queued ones completed")

    # a task whose worker dies 3 times fails with 5003
    xid, _ = ca._submit(MODEL, {"prompt": prompt, "image": image, **LONG})
    for attempt in (1, 2, 3):
        deadline = time.time() + 60
        while task_field(xid, "attempts") != str(attempt):
            assert time.time() < deadline, f"attempt {attempt} never started"
            time.sleep(0.05)
        kill_runner(xid)
        new_worker()
    d = wait_done("b", [xid])[xid]
    assert d["status"] == "failed" and d["code"] == 5003 and "3 times" in d["error"], d
    print(f"3 dead workers: failed with 5003 ({d['error']})")

    # metrics: the cluster view on every API node, the workers' own on their ports
    # (the workers' heartbeats resume within a third of the claim timeout of Redis's return)
    want = [f'skyreels_model_workers{{model="{MODEL}"}} 2', f'skyreels_model_queue_depth{{model="{MODEL}"}} 0']
    for n in "ab":
        deadline = time.time() + 10
        while True:
            text = get(base(n) + "/metrics", auth=False)[1].decode()
            if all(w in text for w in want) or time.time() > deadline:
                break
            time.sleep(0.2)
        assert all(w in text for w in want), text
    for w in [w for w in WORKER_METRICS if w in PROCS]:
        code, text = get(f"http://127.0.0.1:{WORKER_METRICS[w]}/metrics", auth=False)
        assert code == 200 and "skyreels_workers 1" in text.decode(), text
    print("metrics: ok")

    upload_flood(ca)
    hung_redis()
    forged_entry(ca)
    full_redis()

    # the queue bound holds cluster-wide; a model with no live worker still queues (database 1:
    # the model announced, as by a worker that has not started yet, and no worker)
    for k, v in redis_hash("skyreels:models").items():
        redis("-n", "1", "HSET", "skyreels:models", k, v)
    for n in ("c", "d"):
        N.start_serve(n, "--redis", N.redis_url(1), "--workers", "0", "--max-queue", "3")
    for n in ("c", "d"):
        for _ in range(300):
            try:
                code, body = get(base(n) + "/ready", auth=False)
                break
            except OSError:
                time.sleep(0.1)
        assert code == 503 and b"no live worker for " + MODEL.encode() in body, (code, body)
    taken = [clients_for(n)._submit(MODEL, {"prompt": prompt, "image": image})[0] for n in "cdc"]
    try:
        clients_for("d")._submit(MODEL, {"prompt": prompt, "image": image})
        sys.exit("a 4th task was admitted past --max-queue 3")
    except RuntimeError as e:
        assert "HTTP 429" in str(e), e
    positions = [result("d", t)["queue_position"] for t in taken]
    assert positions == [0, 1, 2], positions
    print("max-queue 3 across two nodes: the 4th submit got 429; positions", positions)

    N.stop_all()
    print("cluster test passed")


try:
    main()
finally:
    N.kill_all()
