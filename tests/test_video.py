"""Video input: decoding and sampling (dvd/video.py) on small videos made here with PyAV in
several containers and codecs, the limits and bad files, InternVL's frame prompt and the
split of many frames over Encode calls, and the gateway's `video_url` parts (data: URLs and
http(s) from loopback servers under the media guard) against a fake language server.

The end-to-end check through a real stack is in tests/test_video_stack.py.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import torch

from dvd.deadline import Deadline
from dvd.errors import InvalidInput
from dvd.v1 import language_pb2
from dvd.video import VideoError, VideoLimits, sample_indices, sample_video
from gateway.cli import config_from_args
from gateway.config import GatewayConfig
from language_server.image_features import EncodedImages
from language_server.video_prompt import (
    FRAME_TILES,
    encode_visual,
    frame_prompt,
    visual_inputs,
)
from tests.test_gateway import (
    FakeLanguage,
    assert_openai_error,
    chat,
    fake_language,  # noqa: F401  (a fixture)
    png,
    serve,
)
from tests.videos import CODECS, make_video, which_frame

pytestmark = pytest.mark.timeout(120)

PARAM = "messages[0].content[0].video_url.url"


# ---- decoding and sampling --------------------------------------------------------------


def test_sample_indices_like_vllm() -> None:
    # vLLM's uniform sampler: min(num_frames, floor(duration * fps), total), linspace.
    assert sample_indices(20, 2.0, 2.0, 32) == [0, 6, 13, 19]
    assert sample_indices(20, 2.0, 0, 32) == list(range(20))  # no rate cap: every frame
    assert sample_indices(300, 10.0, 0, 32) == [round(i * 299 / 31 + 1e-9) for i in range(32)]
    assert sample_indices(300, 10.0, 2.0, 8) == [round(i * 299 / 7 + 1e-9) for i in range(8)]
    assert sample_indices(5, 0.2, 2.0, 32) == [0]  # shorter than one sampling period
    assert sample_indices(1, 0.1, 2.0, 32) == [0]
    assert sample_indices(0, 0.0, 2.0, 32) == []


@pytest.mark.parametrize("kind", list(CODECS))
def test_decode_and_sample(kind: str) -> None:
    data = make_video(kind, frames=20, rate=10)
    video = sample_video(data, VideoLimits(fps=2.0, max_frames=32))
    assert video.source_frames == 20 and video.source_fps == pytest.approx(10.0)
    assert video.duration_s == pytest.approx(2.0)
    assert video.frame_indices == [0, 6, 13, 19]
    assert video.timestamps_s == pytest.approx([0.0, 0.6, 1.3, 1.9])
    assert (video.width, video.height) == (64, 48)
    assert all(f.startswith(b"\x89PNG") for f in video.frames)
    # Each PNG is the frame it claims to be (the colours tell the frames apart).
    assert [which_frame(f, 20) for f in video.frames] == video.frame_indices


def test_frame_cap_and_no_rate_cap() -> None:
    data = make_video("mp4", frames=30, rate=10)
    capped = sample_video(data, VideoLimits(fps=0, max_frames=4))
    assert capped.frame_indices == [0, 10, 19, 29]
    assert [which_frame(f, 30) for f in capped.frames] == [0, 10, 19, 29]
    every = sample_video(data, VideoLimits(fps=0, max_frames=100))
    assert every.frame_indices == list(range(30))


def refused_with(data: bytes, limits: VideoLimits, limit: str | None, needle: str) -> None:
    with pytest.raises(VideoError) as caught:
        sample_video(data, limits)
    assert caught.value.limit == limit, caught.value.message
    assert needle in caught.value.message


def test_limits() -> None:
    video = make_video("mp4", frames=40, rate=10, width=64, height=48)
    refused_with(video, VideoLimits(max_duration_s=3.0), "max_duration_s", "4.0 s")
    refused_with(video, VideoLimits(max_pixels=64 * 47), "max_pixels", "64x48")


def test_frame_count_limit() -> None:
    # Many frames in a short video: refused by their count before any is decoded.
    fast = make_video("avi", frames=60, rate=60)  # 1 s at 60 fps
    refused_with(
        fast, VideoLimits(max_duration_s=2.0, max_source_fps=20), "max_source_frames", "40"
    )


def test_decode_time_limit() -> None:
    refused_with(
        make_video("mp4", frames=20), VideoLimits(decode_timeout_s=1e-6), "decode_timeout_s", "s"
    )


def test_bad_files() -> None:
    good = make_video("mp4")
    refused_with(b"", VideoLimits(), None, "not a video")
    refused_with(b"garbage " * 500, VideoLimits(), None, "not a video")
    refused_with(png(32, 24), VideoLimits(), None, "not a video")  # images are not videos here
    refused_with(good[: len(good) // 3], VideoLimits(), None, "")  # moov atom cut off
    # A playlist that would make FFmpeg open a local file: never probed.
    m3u8 = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"
    refused_with(m3u8, VideoLimits(), None, "not a video")
    audio_only = _audio_only()
    refused_with(audio_only, VideoLimits(), None, "no video stream")


def _audio_only() -> bytes:
    import io

    import av
    import numpy as np

    out = io.BytesIO()
    with av.open(out, mode="w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def test_damaged_middle_still_decodes_or_refuses_cleanly() -> None:
    data = bytearray(make_video("avi", frames=20))
    for i in range(len(data) // 2, len(data) // 2 + 400):
        data[i] ^= 0x5A
    try:
        video = sample_video(bytes(data), VideoLimits())
    except VideoError:
        return
    assert video.frames and len(video.frames) == len(video.timestamps_s)


# ---- InternVL's frame prompt and the Encode calls ----------------------------------------


def video_part(frames: Sequence[bytes]) -> language_pb2.ContentPart:
    return language_pb2.ContentPart(
        video=language_pb2.VideoFrames(
            frames=frames, timestamps_s=[0.5 * i for i in range(len(frames))]
        )
    )


def test_frame_prompt() -> None:
    assert frame_prompt(3, "<image>") == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>"


def test_visual_inputs_keep_order_and_give_frames_one_tile() -> None:
    message = language_pb2.ChatMessage(
        role="user",
        content=[
            language_pb2.ContentPart(image=b"img-a"),
            video_part([b"f0", b"f1"]),
            language_pb2.ContentPart(text="what happens?"),
            language_pb2.ContentPart(image=b"img-b"),
        ],
    )
    inputs = visual_inputs([message], max_images=2)
    assert [i.data for i in inputs] == [b"img-a", b"f0", b"f1", b"img-b"]
    assert [i.max_tiles for i in inputs] == [0, FRAME_TILES, FRAME_TILES, 0]
    with pytest.raises(InvalidInput, match="2 images"):
        visual_inputs([message], max_images=1)  # frames do not count as images
    empty = language_pb2.ChatMessage(role="user", content=[video_part([])])
    with pytest.raises(InvalidInput, match="no frames"):
        visual_inputs([empty], max_images=2)


class RecordingSource:
    """A FeatureSource whose features are one row per image: [index of the image]."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], list[int]]] = []
        self.released = 0

    async def encode(
        self,
        request_id: str,
        images: list[bytes],
        mode: Any = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),
    ) -> EncodedImages:
        self.calls.append((images, list(max_tiles)))
        await asyncio.sleep(0.01 * (3 - len(self.calls)))  # later calls finish first

        def release() -> None:
            self.released += 1

        rows = [torch.tensor([[float(image.decode().removeprefix("i"))]]) for image in images]
        return EncodedImages(features=rows, encode_ns=len(images), release=release)


def test_encode_visual_splits_and_joins_in_order() -> None:
    source = RecordingSource()
    message = language_pb2.ChatMessage(
        role="user", content=[video_part([f"i{n}".encode() for n in range(5)])]
    )
    inputs = visual_inputs([message], max_images=4)
    encoded = asyncio.run(encode_visual(source, "r", inputs, None, Deadline(), per_call=2))
    assert [len(images) for images, _ in source.calls] == [2, 2, 1]
    assert all(tiles == [1] * len(images) for images, tiles in source.calls)
    assert [float(f[0, 0]) for f in encoded.features] == [0, 1, 2, 3, 4]
    assert encoded.encode_ns == 2  # calls that ran at once: the longest
    encoded.release()
    assert source.released == 3


# ---- the gateway -------------------------------------------------------------------------


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_url_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def ask(gateway: str, *urls: str) -> httpx.Response:
    body = chat([video_url_part(url) for url in urls] + [{"type": "text", "text": "describe"}])
    return httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=60)


def refused(response: httpx.Response, needle: str, param: str = PARAM) -> dict[str, Any]:
    error = assert_openai_error(response, 400)
    assert error["param"] == param and needle in error["message"], error
    return error


def config(language: str, **settings: Any) -> GatewayConfig:
    return GatewayConfig(language_addresses=(language,), **settings)


def test_gateway_sends_the_sampled_frames(fake_language: tuple[str, FakeLanguage]) -> None:  # noqa: F811
    address, servicer = fake_language
    with serve(config(address)) as gateway:
        response = ask(gateway, data_url(make_video("webm"), "video/webm"))
        assert response.status_code == 200, response.text
        parts = servicer.requests[-1].messages[0].content
        assert [p.WhichOneof("kind") for p in parts] == ["video", "text"]
        video = parts[0].video
        assert list(video.frame_indices) == [0, 6, 13, 19]
        assert list(video.timestamps_s) == pytest.approx([0.0, 0.6, 1.3, 1.9])
        assert [which_frame(f, 20) for f in video.frames] == [0, 6, 13, 19]
        assert video.source_frames == 20 and video.duration_s == pytest.approx(2.0)
        metrics = httpx.get(f"{gateway}/metrics").text
        assert 'dvd_gateway_videos_total{outcome="ok"} 1.0' in metrics
        assert "dvd_gateway_video_frames_total 4.0" in metrics
        assert "dvd_gateway_video_decode_seconds_count 1.0" in metrics


def test_gateway_refusals(fake_language: tuple[str, FakeLanguage]) -> None:  # noqa: F811
    address, _ = fake_language
    small = config(
        address, max_video_bytes=20_000, max_video_duration_s=3.0, max_videos_per_request=1
    )
    with serve(small) as gateway:
        long_video = make_video("mp4", frames=40, rate=10)
        error = refused(ask(gateway, data_url(long_video)), "--max-video-duration-s")
        assert "4.0 s" in error["message"] and error["code"] == "video_too_large"
        error = refused(ask(gateway, data_url(b"not a video at all")), "not a video")
        assert error["code"] == "invalid_video"
        big = make_video("gif", frames=20, width=128, height=96)
        assert len(big) > 20_000
        refused(ask(gateway, data_url(big, "video/gif")), "larger than the limit of 20000")
        refused(ask(gateway, data_url(make_video(), "image/png")), "video MIME type")
        refused(ask(gateway, "ftp://example.com/a.mp4"), "unsupported video URL scheme")
        two = ask(gateway, data_url(make_video()), data_url(make_video()))
        error = refused(two, "2 videos", param="messages")
        assert error["code"] == "too_many_videos"
        metrics = httpx.get(f"{gateway}/metrics").text
        assert 'dvd_gateway_videos_total{outcome="refused"} 2.0' in metrics
    with serve(config(address, max_video_pixels=1000)) as gateway:
        refused(ask(gateway, data_url(make_video())), "--max-video-pixels")


def test_flags() -> None:
    from dvd.cli import build_parser

    args = build_parser().parse_args(["gateway"])
    defaults = config_from_args(args)
    assert (defaults.video_fps, defaults.max_video_frames) == (2.0, 32)
    assert defaults.max_video_duration_s == 300.0
    argv = ["gateway", "--video-fps", "0", "--max-video-frames", "8", "--max-video-bytes", "1000"]
    argv += ["--max-video-duration-s", "10", "--max-video-pixels", "5000"]
    parsed = config_from_args(build_parser().parse_args(argv))
    limits = parsed.video_limits()
    assert (limits.fps, limits.max_frames, limits.max_duration_s, limits.max_pixels) == (
        0.0,
        8,
        10.0,
        5000,
    )
    assert parsed.max_video_bytes == 1000
    with pytest.raises(ValueError, match="video_fps"):
        GatewayConfig(video_fps=-1)
    with pytest.raises(ValueError, match="max_video_frames"):
        GatewayConfig(max_video_frames=0)


class VideoHandler(BaseHTTPRequestHandler):
    """/clip.mp4 (video/mp4), /blob (application/octet-stream), /page (text/html)."""

    body = b""

    def do_GET(self) -> None:
        kinds = {"/clip.mp4": "video/mp4", "/blob": "application/octet-stream"}
        kind = kinds.get(self.path, "text/html")
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def video_server() -> Iterator[str]:
    VideoHandler.body = make_video("mp4")
    server = ThreadingHTTPServer(("127.0.0.2", 0), VideoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_videos_follow_the_media_rules(
    fake_language: tuple[str, FakeLanguage],  # noqa: F811
    video_server: str,
) -> None:
    address, servicer = fake_language
    with serve(config(address)) as gateway:  # loopback: refused by default
        error = refused(ask(gateway, f"{video_server}/clip.mp4"), "127.0.0.2 (loopback)")
        assert error["code"] == "media_refused"
    with serve(config(address, remote_images=False)) as gateway:
        refused(ask(gateway, f"{video_server}/clip.mp4"), "not fetched")
    with serve(config(address, allow_private_media_addresses=True)) as gateway:
        for path in ("/clip.mp4", "/blob"):
            response = ask(gateway, f"{video_server}{path}")
            assert response.status_code == 200, response.text
            video = servicer.requests[-1].messages[0].content[0].video
            assert list(video.frame_indices) == [0, 6, 13, 19]
        error = refused(ask(gateway, f"{video_server}/page"), "not video/*")
        assert error["code"] == "invalid_video_content_type"
    small = config(address, allow_private_media_addresses=True, max_video_bytes=100)
    with serve(small) as gateway:
        refused(ask(gateway, f"{video_server}/clip.mp4"), "video is larger than the limit of 100")


def test_video_refused_when_language_servers_take_none() -> None:
    from gateway.convert import ModelLimits, to_generate_request
    from gateway.errors import ApiError
    from gateway.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        chat([video_url_part(data_url(make_video())), {"type": "text", "text": "hi"}])
    )
    limits = ModelLimits(accepts_video=False)  # Info of a server that predates video parts
    with pytest.raises(ApiError) as caught:
        asyncio.run(to_generate_request(request, "r", GatewayConfig(), None, limits))
    assert caught.value.status == 400 and caught.value.code == "video_not_supported"
    converted = asyncio.run(to_generate_request(request, "r", GatewayConfig(), None))
    assert converted.messages[0].content[0].WhichOneof("kind") == "video"


def test_frames_beyond_one_grpc_message_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.convert
    from gateway.errors import ApiError
    from gateway.protocol import ChatCompletionRequest

    monkeypatch.setattr(gateway.convert, "MAX_MESSAGE_BYTES", 200)  # the 4 PNGs take more
    request = ChatCompletionRequest.model_validate(chat([video_url_part(data_url(make_video()))]))
    with pytest.raises(ApiError) as caught:
        asyncio.run(gateway.convert.to_generate_request(request, "r", GatewayConfig(), None))
    assert caught.value.status == 400 and "one request may carry" in caught.value.message


@pytest.mark.parametrize(
    ("rotation", "red_side"), [(0, "top"), (90, "left"), (-90, "right"), (180, "bottom")]
)
def test_frames_are_turned_upright(rotation: int, red_side: str) -> None:
    """A display matrix (phones store portrait video sideways) turns the frames as players
    and OpenCV (vLLM's decoder) show them; here the top half of every stored frame is red."""
    import io

    import numpy as np
    from PIL import Image

    data = make_video("mp4", frames=4, width=64, height=48, rotation=rotation, top=(255, 0, 0))
    video = sample_video(data, VideoLimits())
    with Image.open(io.BytesIO(video.frames[0])) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    turned = rotation % 180 != 0
    assert pixels.shape[:2] == ((64, 48) if turned else (48, 64))
    assert (video.width, video.height) == ((48, 64) if turned else (64, 48))
    h, w = pixels.shape[:2]
    halves = {
        "top": pixels[: h // 2],
        "bottom": pixels[h // 2 :],
        "left": pixels[:, : w // 2],
        "right": pixels[:, w // 2 :],
    }
    assert halves[red_side][..., 0].mean() > 200 and halves[red_side][..., 1].mean() < 60


def test_a_decode_keeps_its_slot_after_its_client_goes_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--max-concurrent-video-decodes bounds decoding threads, not waiting requests: a
    request cancelled mid-decode (its client went away) leaves the thread running, and the
    slot stays taken until the thread ends. The decoder is held on an event here (the slot
    accounting is the subject, not PyAV)."""
    import gateway.videos

    release = threading.Event()
    real = gateway.videos.sample_video

    def held(data: bytes, limits: VideoLimits) -> Any:
        release.wait(30)
        return real(data, limits)

    monkeypatch.setattr(gateway.videos, "sample_video", held)
    loader = gateway.videos.VideoLoader(GatewayConfig(max_concurrent_video_decodes=1), None)

    async def scenario() -> None:
        url = data_url(make_video())
        first = asyncio.create_task(loader.load(url, "messages[0].content[0]"))
        while not loader.slots.locked():
            await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert loader.slots.locked(), "the cancelled request's decode still runs"
        release.set()
        frames = await loader.load(url, "messages[0].content[0]")  # waits for that slot
        assert len(frames.frames) > 0

    asyncio.run(scenario())
