"""WaveSpeed's own MCP server (`wavespeed-mcp`, the way AI assistants call WaveSpeed) against a live
`skyreels serve` (run by scripts/test_mcp.sh).

Usage: mcp_client.py BASE_URL API_KEY IMAGE
Starts `wavespeed-mcp` (from this venv) as an MCP stdio server with WAVESPEED_API_HOST=BASE_URL, as an
assistant would, and calls its `generate_video` tool over the MCP protocol with WaveSpeed's video fields:
`size`, `duration` (the tool takes only 5 or 10 seconds: 121 frames at 24 fps), `flow_shift` and
`num_inference_steps`. Checks: the returned MP4 decodes (PyAV) to the asked width, height and frame
count; the task's prediction echoes the fields and records the frames used; the same call again gives
the same frames and another flow_shift other frames (the shift reaches the sampler); the tool's
`loras` reach the server: a bare hub repository id (no file) is refused with the server's message
naming `loras`, not ignored.
"""
import asyncio
import io
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import av
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

BASE, KEY, IMAGE = sys.argv[1], sys.argv[2], str(Path(sys.argv[3]).resolve())
MODEL = "wavespeed-ai/SkyReels-V1"
# 48x32 is small for the tiny model's 121 frames on a CPU, and not its default 96x64
WIDTH, HEIGHT, DURATION, FRAMES = 48, 32, 5, 121


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


def get(url):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def tool_result(result):
    assert not result.isError, result
    return json.loads(result.content[0].text)


def decode(url):
    """(width, height, luma bytes) of each frame of the MP4 at `url`."""
    with av.open(io.BytesIO(get(url))) as c:
        return [(f.width, f.height, bytes(f.planes[0])) for f in c.decode(c.streams.video[0])]


async def generate(session, args):
    out = tool_result(await session.call_tool("generate_video", args))
    assert out["status"] == "success" and out["model"] == MODEL, out
    return out["urls"][0]


async def main():
    wait_ready()
    server = StdioServerParameters(
        command=str(Path(sys.executable).parent / "wavespeed-mcp"),
        env={**os.environ, "WAVESPEED_API_KEY": KEY, "WAVESPEED_API_HOST": BASE,
             "WAVESPEED_API_RESOURCE_MODE": "url", "WAVESPEED_LOG_LEVEL": "WARNING"},
    )
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {t.name for t in (await session.list_tools()).tools}
        assert "generate_video" in tools, tools
        args = dict(image=IMAGE, prompt="FPS-24, a sunny meadow", model=MODEL, size=f"{WIDTH}*{HEIGHT}",
                    duration=DURATION, num_inference_steps=2, flow_shift=5, guidance_scale=1, seed=11)
        url = await generate(session, args)
        frames = decode(url)
        got = (frames[0][0], frames[0][1], len(frames))
        assert got == (WIDTH, HEIGHT, FRAMES), f"{url}: got {got}, want {(WIDTH, HEIGHT, FRAMES)}"
        print("generate_video:", url, got)
        # the prediction: the request as the tool sent it, and the frames used
        task_id = url.rsplit("/", 1)[1].removesuffix(".mp4")
        task = json.loads(get(f"{BASE}/api/v3/predictions/{task_id}/result"))["data"]
        sent = task["input"]
        assert (sent["size"], sent["duration"], sent["flow_shift"], sent["loras"], sent["enable_safety_checker"]) \
            == (f"{WIDTH}*{HEIGHT}", DURATION, 5, [], True), sent
        assert (task["num_frames"], task["progress"]["total"]) == (FRAMES, 2), task
        # the seed fixes the noise: the same call makes the same frames, another shift others
        assert decode(await generate(session, args)) == frames, "the same call made other frames"
        shifted = decode(await generate(session, dict(args, flow_shift=2)))
        luma = lambda video: b"".join(f[2] for f in video)  # noqa: E731
        change = sum(abs(a - b) for a, b in zip(luma(frames), luma(shifted))) / len(luma(frames))
        assert change > 1, f"flow_shift 2 instead of 5 changed the frames by only {change:.3f} levels"
        print(f"flow_shift 2 instead of 5: frames differ by {change:.1f} levels on average")
        # the tool's loras reach the server: a repository id without a file is refused, with the
        # server's reason passed through the tool
        args = dict(args, loras=[{"path": "Remade-AI/Deflate", "scale": 1.0}])
        out = tool_result(await session.call_tool("generate_video", args))
        assert out["status"] == "error" and 'loras: [0] \\"Remade-AI/Deflate\\"' in out["error"] \
            and "OWNER/REPO/FILE.safetensors" in out["error"], out
        print("loras refused:", out["error"][:160])
    print("MCP OK")


asyncio.run(main())
