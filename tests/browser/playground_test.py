"""The playground page in a real browser (run by scripts/test_playground.sh).

Usage: playground_test.py BASE_URL API_KEY IMAGE OUT_DIR
Debian's Chromium, driven by Selenium through Debian's chromedriver (no browser download), against a
live `skyreels serve` on the tiny weights with an API key: enter the key, upload an image file, submit,
see the progress bar move, see the <video> load a playable clip (duration and videoWidth read through
JavaScript) with the Advanced section's flow shift in the task's input, cancel a second long task, submit a third
with one LoRA row (style, a file of the server's --lora-dir that test_playground.sh provides) and find it in the
task's input (rows are added up to three and removed), reload and find the first two in the history; the key is kept for the tab (sessionStorage) unless "remember" is ticked (then
localStorage, and a new tab finds it). The Swagger UI at /docs renders the API under its policy. Neither page
logs a Content-Security-Policy violation. Writes a screenshot of the finished state to OUT_DIR/playground.png.
"""
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

BASE, KEY, IMAGE, OUT = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp()}"]:
        o.add_argument(flag)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=o)


def until(what, check, limit=120):
    end = time.time() + limit
    while time.time() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def no_csp_violations(d, page):
    """Fails on any policy violation in the console log since the last call (reading drains it)."""
    log = d.get_log("browser")
    refused = [e["message"] for e in log if "Content Security Policy" in e["message"]]
    assert not refused, f"{page}: {refused}"


def stored_key(d):
    return d.execute_script("return [sessionStorage.getItem('skyreels.apiKey'), localStorage.getItem('skyreels.apiKey')]")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    d = browser()
    js = d.execute_script
    try:
        d.get(BASE + "/playground")
        # without the key the page says it needs one (and submits are disabled)
        until("the key request", lambda: "API key" in d.find_element(By.ID, "server-state").text
              or "Unauthorized" in d.find_element(By.ID, "page-error").text)
        assert d.find_element(By.ID, "run").get_attribute("disabled") is not None
        key = d.find_element(By.ID, "api-key")
        key.send_keys(KEY)
        js("arguments[0].dispatchEvent(new Event('change'))", key)
        until("the model", lambda: d.find_element(By.ID, "model-id").text == "wavespeed-ai/SkyReels-V1")
        # by default the key is kept for this tab only, not on the device
        assert not d.find_element(By.ID, "remember-key").is_selected()
        assert stored_key(d) == [KEY, None], stored_key(d)
        # the model's defaults are shown
        for field, default in [("num_inference_steps", "4"), ("num_frames", "9"), ("guidance_scale", "6"),
                               ("embedded_guidance_scale", "1"), ("fps", "24"), ("width", "96"),
                               ("cache", "none"), ("cfg_gate", "off"), ("flow_shift", "the model's"),
                               ("riflex_freq_index", "0")]:
            shown = d.find_element(By.ID, field).get_attribute("placeholder")
            assert shown == default, f"{field}: {shown!r}, want {default}"
        d.find_element(By.ID, "image-file").send_keys(str(Path(IMAGE).resolve()))
        until("the upload", lambda: "uploaded" in d.find_element(By.ID, "image-status").text)
        assert js("return document.getElementById('image-preview').naturalWidth") > 0, "no preview"
        prompt = d.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("FPS-24, a sunny meadow")
        d.find_element(By.ID, "advanced").click()
        # long enough for several polls: 97 frames, 100 steps of the tiny model
        for field, value in [("num_frames", "97"), ("num_inference_steps", "100"), ("flow_shift", "5"),
                             ("cfg_gate", "0.9")]:
            d.find_element(By.ID, field).send_keys(value)
        d.find_element(By.ID, "run").click()
        first = until("the task id", lambda: d.find_element(By.ID, "task-id").text)
        # the progress bar moves: values strictly between 0 and done, then done
        seen = set()
        def progressed():
            v, m = js("const p = document.getElementById('progress'); return [p.value, p.max]")
            seen.add(v)
            return d.find_element(By.ID, "task-status").text == "completed"
        until("the first task", progressed, limit=300)
        moving = sorted(v for v in seen if 0 < v < 100)
        assert moving, f"the progress bar never showed a step between 0 and 100: {sorted(seen)}"
        # the progress came from the task's event stream, not from polling
        follow = js("return document.body.dataset.follow")
        assert follow == "events", f"the playground followed the task by {follow!r}"
        # a playable clip
        until("the video's metadata", lambda: js("return document.getElementById('video').readyState") >= 1)
        duration, width, height, err = js(
            "const v = document.getElementById('video'); return [v.duration, v.videoWidth, v.videoHeight, v.error && v.error.code]")
        assert err is None, f"the video element failed: code {err}"
        assert abs(duration - 97 / 24) < 0.1 and (width, height) == (96, 64), (duration, width, height)
        js("return document.getElementById('video').play()")
        until("playback", lambda: js("return document.getElementById('video').currentTime") > 0, limit=30)
        assert d.find_element(By.ID, "download").get_attribute("href").endswith(f"/outputs/{first}.mp4")
        assert d.find_element(By.ID, "seed-used").text.isdigit()
        # the Advanced section's flow shift reached the task
        task = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{BASE}/api/v3/predictions/{first}/result", headers={"Authorization": f"Bearer {KEY}"})))
        assert task["data"]["input"]["flow_shift"] == 5, task["data"]["input"]
        assert task["data"]["input"]["cfg_gate"] == 0.9, task["data"]["input"]
        timings = d.find_element(By.ID, "timings").text
        assert "denoising" in timings, timings
        # the forward counts are shown as counts (100 steps with true CFG, no cache; the CFG gate at 0.9
        # skips the negative prompt's forward of steps 90..99, counted as cached)
        assert "forwards_computed: 190\n" in timings + "\n" and "forwards_cached: 10\n" in timings + "\n", timings
        d.save_screenshot(str(OUT / "playground.png"))

        # a second long task, cancelled while it runs
        d.find_element(By.ID, "run").click()
        second = until("a second task", lambda: (t := d.find_element(By.ID, "task-id").text) != first and t)
        until("it to run", lambda: d.find_element(By.ID, "task-status").text == "processing")
        d.find_element(By.ID, "cancel").click()
        until("the cancel", lambda: d.find_element(By.ID, "task-status").text == "cancelled", limit=60)

        # a short task with one LoRA row: the request carries it (the task's input echoes it) and
        # the tiny server applies it
        for field in ["num_frames", "num_inference_steps"]:
            d.find_element(By.ID, field).clear()
        add = d.find_element(By.ID, "add-lora")
        for _ in range(3):
            add.click()
        assert add.get_attribute("disabled") is not None, "a fourth LoRA row can be added"
        rows = d.find_elements(By.CSS_SELECTOR, "#loras li")
        for row in rows[1:]:
            row.find_element(By.CLASS_NAME, "remove-lora").click()
        assert len(d.find_elements(By.CSS_SELECTOR, "#loras li")) == 1 and add.get_attribute("disabled") is None
        rows[0].find_element(By.CLASS_NAME, "lora-path").send_keys("style")
        rows[0].find_element(By.CLASS_NAME, "lora-scale").send_keys("0.5")
        d.find_element(By.ID, "run").click()
        third = until("a third task", lambda: (t := d.find_element(By.ID, "task-id").text) not in (first, second) and t)
        until("its end", lambda: d.find_element(By.ID, "task-status").text in ("completed", "failed"), limit=300)
        task = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{BASE}/api/v3/predictions/{third}/result", headers={"Authorization": f"Bearer {KEY}"})))["data"]
        assert task["input"]["loras"] == [{"path": "style", "scale": 0.5}], task["input"]
        assert task["status"] == "completed", task
        rows[0].find_element(By.CLASS_NAME, "remove-lora").click()

        # after a reload, both are in the history, with a thumbnail for the finished one
        d.refresh()
        def history():
            items = d.find_elements(By.CSS_SELECTOR, "#history li")
            states = {i.get_attribute("data-id"): i.find_element(By.CLASS_NAME, "status").text for i in items}
            return states if states.get(first) == "completed" and states.get(second) == "cancelled" else None
        states = until("the history", history, limit=30)
        until("the thumbnail", lambda: js(
            f"const v = document.querySelector('#history li[data-id=\"{first}\"] video'); return v && v.readyState >= 1"),
            limit=30)
        # reopening the finished one from the history shows its clip again
        d.find_element(By.CSS_SELECTOR, f"#history li[data-id='{first}']").click()
        until("the reopened clip", lambda: d.find_element(By.ID, "task-status").text == "completed"
              and js("return document.getElementById('video').readyState") >= 1)
        d.save_screenshot(str(OUT / "playground.png"))
        # an API error is shown, not a blank page: no image
        js("document.getElementById('image-url').value = ''; document.getElementById('image-url').dispatchEvent(new Event('change'))")
        d.find_element(By.ID, "run").click()
        until("the error", lambda: "image" in d.find_element(By.ID, "task-error").text, limit=30)
        # an image URL elsewhere is not previewed (the page loads images from this origin only)
        js("document.getElementById('image-url').value = 'https://example.com/x.png'; document.getElementById('image-url').dispatchEvent(new Event('change'))")
        assert d.find_element(By.ID, "image-preview").get_attribute("hidden") is not None
        assert "no preview" in d.find_element(By.ID, "image-status").text
        no_csp_violations(d, "/playground")

        # "remember": the key goes to localStorage, a new tab finds it; unticked, it is gone from there
        d.find_element(By.ID, "remember-key").click()
        assert stored_key(d) == [KEY, KEY], stored_key(d)
        playground = d.current_window_handle
        d.switch_to.new_window("tab")
        d.get(BASE + "/playground")
        until("the remembered key", lambda: d.find_element(By.ID, "model-id").text == "wavespeed-ai/SkyReels-V1")
        assert d.find_element(By.ID, "api-key").get_attribute("value") == KEY
        assert d.find_element(By.ID, "remember-key").is_selected()
        d.close()
        d.switch_to.window(playground)
        d.find_element(By.ID, "remember-key").click()
        assert stored_key(d) == [KEY, None], stored_key(d)
        no_csp_violations(d, "/playground")

        # the Swagger UI renders the API (its title and operations) under its policy
        d.get(BASE + "/docs/")
        until("the API title", lambda: "skyreels-server" in js(
            "const t = document.querySelector('.info .title'); return t ? t.textContent : ''"), limit=30)
        paths = until("the operations", lambda: js(
            "return [...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)"), limit=30)
        assert "/api/v3/{owner}/{model}" in paths, paths
        no_csp_violations(d, "/docs/")
        print(f"playground OK: tasks {first} (completed, {duration:.2f} s, {width}x{height}) and {second} "
              f"(cancelled); history {states}; /docs with {len(paths)} operations; "
              f"screenshot {OUT / 'playground.png'}")
    finally:
        d.quit()


main()
