"""OpenAI-compatible captioner against a real HTTP server on 127.0.0.1.

The server started here stands in for a remote GPU inference server (vLLM / SGLang serving a VLM): it speaks the
chat-completions protocol over real sockets, fails the first N requests with 503 like an overloaded server, and
answers with a caption computed from what it received (so the test checks what was actually sent).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from keye.data.captioners import CaptionerError, CaptionerUnavailable, ClipRef, build_captioner


class FakeVLMServer:
    def __init__(
        self, fail_first: int = 0, status: int = 503, delay_s: float = 0.0, slow_first: int = 0
    ) -> None:
        self.fail_first, self.status, self.delay_s, self.slow_first = fail_first, status, delay_s, slow_first
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.n = 0
        self.inflight = 0
        self.max_inflight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.n += 1
                    n = outer.n
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                try:
                    if n <= outer.slow_first:
                        time.sleep(1.0)  # longer than the client's timeout
                    time.sleep(outer.delay_s)
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if n <= outer.fail_first:
                        return self._send(outer.status, {"error": "overloaded"})
                    return self._send(200, outer.answer(body))
                finally:
                    with outer.lock:
                        outer.inflight -= 1

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def answer(body: dict) -> dict:
        parts = body["messages"][0]["content"]
        times = [p["text"] for p in parts if p["type"] == "text"][:-1]
        imgs = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        first = Image.open(io.BytesIO(base64.b64decode(imgs[0].split(",", 1)[1])))
        level = int(np.asarray(first).mean())
        answer = {
            "caption": f"{len(imgs)} frames {first.size[0]}x{first.size[1]} level {level} first {times[0]}",
            "dense_captions": [
                {"start": 0.0, "end": 1.0, "text": "something"},
                {"start": 0.5, "end": 99, "text": "x"},
            ],
        }
        text = "```json\n" + json.dumps(answer) + "\n```"
        return {
            "choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10},
        }

    def __enter__(self) -> FakeVLMServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *a: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """8 s at 4 fps, 112x84; frame i is a flat grey of level 10*i, so the server can tell which frame it got."""
    path = tmp_path_factory.mktemp("v") / "grey.mp4"
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=4)
        st.width, st.height, st.pix_fmt = 112, 84, "yuv420p"
        st.options = {"crf": "10"}
        for i in range(32):
            frame = av.VideoFrame.from_ndarray(np.full((84, 112, 3), 10 + 7 * i, np.uint8), format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


def clips(video: Path, n: int = 4) -> list[ClipRef]:
    return [ClipRef(f"c{i}", str(video), 2.0 * i, 2.0 * i + 2.0, 4.0, 112, 84, "grey") for i in range(n)]


def cfg(url: str, **kw: object) -> dict:
    return {
        "backend": "openai",
        "base_url": url,
        "model": "fake-vlm",
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        **kw,
    }


@pytest.fixture()
def server(request) -> Iterator[FakeVLMServer]:
    with FakeVLMServer(**getattr(request, "param", {})) as s:
        yield s


@pytest.mark.parametrize("server", [{"fail_first": 3, "delay_s": 0.05}], indirect=True)
def test_captions_with_timestamps_after_503_retries(server: FakeVLMServer, video: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEYE_TEST_VLM_KEY", "sekret")
    cap = build_captioner(
        cfg(server.url, api_key_env="KEYE_TEST_VLM_KEY", concurrency=2, fps=1.0, max_frames=4)
    )
    recs = cap.caption(clips(video))
    assert [r.clip_id for r in recs] == ["c0", "c1", "c2", "c3"] and all(r.ok for r in recs)
    assert server.n == 4 + 3 and server.max_inflight <= 2
    assert all(h.get("Authorization") == "Bearer sekret" for h in server.headers)
    r = recs[1]  # clip [2, 4): 2 frames at 1 fps, first one at clip time 0.0 = video frame 8
    h, w = r.meta[
        "frame_size"
    ]  # chosen by keye.data.sampling.plan_frames: sides multiples of 28, aspect kept
    assert h % 28 == 0 and w % 28 == 0 and abs(w / h - 112 / 84) < 0.1
    assert r.caption.startswith(f"2 frames {w}x{h}") and r.caption.endswith("first <0.0 seconds>")
    level = int(r.caption.split("level ")[1].split()[0])
    assert abs(level - (10 + 7 * 8)) <= 4
    assert r.dense_captions == [
        {"start": 0.0, "end": 1.0, "text": "something"},
        {"start": 0.5, "end": 2.0, "text": "x"},
    ]
    assert (r.backend, r.model, r.prompt_version) == ("openai", "fake-vlm", "v1")
    assert r.meta["parsed_as"] == "json" and r.meta["frame_times"] == [0.0, 1.0] and r.meta["usage"]
    assert sum(x.meta["attempts"] for x in recs) == 7
    body = server.requests[-1]
    assert body["model"] == "fake-vlm" and body["temperature"] == 0.0
    kinds = [p["type"] for p in body["messages"][0]["content"]]
    assert kinds == ["text", "image_url", "text", "image_url", "text"]
    assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("server", [{"fail_first": 100}], indirect=True)
def test_gives_up_after_last_retry(server: FakeVLMServer, video: Path) -> None:
    cap = build_captioner(cfg(server.url, max_retries=2, concurrency=1))
    with pytest.raises(CaptionerUnavailable, match=r"gave up after 3 attempts; last error: HTTP 503"):
        cap.caption(clips(video, 1))
    assert server.n == 3


@pytest.mark.parametrize("server", [{"slow_first": 1}], indirect=True)
def test_timeout_is_retried(server: FakeVLMServer, video: Path) -> None:
    cap = build_captioner(
        cfg(server.url, timeout_s=0.4, concurrency=1, image_format="png", prompt="Say {duration}")
    )
    (rec,) = cap.caption(clips(video, 1))
    assert rec.ok and rec.meta["attempts"] == 2 and server.n == 2
    assert rec.prompt_version.startswith("custom-")
    assert server.requests[-1]["messages"][0]["content"][-1]["text"] == "Say 2.0"
    assert server.requests[-1]["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )


@pytest.mark.parametrize("server", [{"fail_first": 100, "status": 400}], indirect=True)
def test_refused_clip_is_an_error_record_and_bad_frames_too(
    server: FakeVLMServer, video: Path, tmp_path: Path
) -> None:
    cap = build_captioner(cfg(server.url))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    recs = cap.caption([clips(video, 1)[0], ClipRef("bad", str(broken), 0, 1, 4, 112, 84)])
    assert "HTTP 400" in recs[0].error and "cannot sample frames" in recs[1].error
    assert server.n == 1  # a refused request is not retried; an undecodable clip sends nothing


def test_config_errors_raise(video: Path) -> None:
    with FakeVLMServer() as s:
        cap = build_captioner(cfg(s.url.replace("/v1", "/v2")))
        with pytest.raises(CaptionerError, match="HTTP 404"):
            cap.caption(clips(video, 1))
    # nothing listens there any more: connection errors are retried, then the batch fails
    cap = build_captioner(cfg(s.url, max_retries=1))
    with pytest.raises(CaptionerUnavailable, match="connection error"):
        cap.caption(clips(video, 1))
