"""The official WaveSpeed Python SDK against a live `skyreels serve` (run by scripts/test_sdk.sh).

Usage: sdk_client.py BASE_URL API_KEY IMAGE
Checks: run (async polling), sync mode, upload then run with the uploaded URL, a bad key; each
returned MP4 downloads and decodes (PyAV) to the expected frame count, size and frame rate. A run
with `loras` naming style, a file of the server's --lora-dir (test_sdk.sh provides it), reaches
the task as sent (the prediction echoes it); a name not in that folder is refused.
"""
import base64
import io
import json
import os
import sys
import time
import urllib.request

BASE, KEY, IMAGE = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["WAVESPEED_API_KEY"] = KEY  # read at import
import av  # noqa: E402
import wavespeed  # noqa: E402

MODEL = "wavespeed-ai/SkyReels-V1"


def wait_ready():
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{BASE}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit("server never became ready")


def check_video(url, frames=9, size=(96, 64), fps=24):
    with urllib.request.urlopen(url, timeout=30) as r:
        data = r.read()
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        decoded = [f for f in c.decode(s)]
        got = (len(decoded), (decoded[0].width, decoded[0].height), round(float(s.average_rate)))
    assert got == (frames, size, fps), f"{url}: got {got}, want {(frames, size, fps)}"
    return got


def get_prediction(task_id):
    req = urllib.request.Request(f"{BASE}/api/v3/predictions/{task_id}/result",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["data"]


def main():
    wait_ready()
    client = wavespeed.Client(api_key=KEY, base_url=BASE)
    with open(IMAGE, "rb") as f:
        data_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    prompt = "FPS-24, a sunny meadow"

    out = client.run(MODEL, {"prompt": prompt, "image": data_uri, "seed": 1}, timeout=300)
    print("run:", out["outputs"], check_video(out["outputs"][0]))

    out = client.run(MODEL, {"prompt": prompt, "image": data_uri, "seed": 2}, enable_sync_mode=True, timeout=300)
    print("sync:", out["outputs"], check_video(out["outputs"][0]))

    url = client.upload(IMAGE)
    assert url.startswith(BASE), url
    out = client.run(MODEL, {"prompt": prompt, "image": url, "num_frames": 5}, timeout=300)
    print("upload + run:", url, check_video(out["outputs"][0], frames=5))

    # one LoRA passes through the SDK to the task, echoed with its scale, and is applied: every
    # key of the file matched a layer of the tiny transformer
    lora = [{"path": "style", "scale": 0.8}]
    result = client.run_no_throw(MODEL, {"prompt": prompt, "image": data_uri, "loras": lora}, timeout=300)
    task = get_prediction(result["task_id"])
    assert task["input"]["loras"] == lora, task["input"]
    assert result["status"] == "completed", task
    check_video(result["outputs"][0])
    assert task["timings"]["lora_unmatched_keys"] == 0, task["timings"]
    print("loras:", task["input"]["loras"], task["status"], task["timings"])
    missing = client.run_no_throw(MODEL, {"prompt": prompt, "image": data_uri, "loras": [{"path": "missing"}]},
                                  timeout=60)
    assert missing["status"] == "failed" and "loras: [0]" in missing["error"], missing
    print("missing LoRA:", missing["error"])
    # a file of the dir that is no LoRA fails its task (1401, naming it) and the worker goes on
    broken = client.run_no_throw(MODEL, {"prompt": prompt, "image": data_uri, "loras": [{"path": "broken"}]},
                                 timeout=300)
    task = get_prediction(broken["task_id"])
    assert broken["status"] == "failed" and task["code"] == 1401, task
    assert 'loras[0] "broken"' in task["error"] and "not a safetensors file" in task["error"], task
    print("broken LoRA:", task["error"])
    again = client.run(MODEL, {"prompt": prompt, "image": data_uri, "loras": lora}, timeout=300)
    print("the same LoRA after it:", check_video(again["outputs"][0]))

    result = client.run_no_throw(MODEL, {"prompt": prompt}, timeout=60)
    assert result["status"] == "failed" and "image" in result["error"], result
    print("missing image:", result["error"])

    bad = wavespeed.Client(api_key="not-the-key", base_url=BASE)
    try:
        bad.run(MODEL, {"prompt": prompt, "image": data_uri}, timeout=60)
        sys.exit("a bad key was accepted")
    except RuntimeError as e:
        assert "HTTP 401" in str(e), e
        print("bad key:", e)
    print("SDK OK")


main()
