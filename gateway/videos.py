"""Turns a `video_url` content part into the frames the language server receives.

`data:video/<type>;base64,` URLs are decoded here; http(s) URLs are fetched by
gateway.media_guard under the same address rules as images, with the video's own size and
time caps (`--max-video-bytes`, `--remote-video-timeout-s`). The file is then decoded and its
frames sampled by dvd.video on a worker thread, at most `--max-concurrent-video-decodes`
videos at once. The result is a `VideoFrames` content part: PNG frames and their times.
Every refusal is a 400 `ApiError` naming the field (`param`), its message the flag.
"""

from __future__ import annotations

import asyncio
import time

from dvd.v1 import language_pb2
from dvd.video import SampledVideo, VideoError, sample_video
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.images import load_media
from gateway.media_guard import MediaFetcher, video_kind
from gateway.metrics import GatewayMetrics

FLAG_OF_LIMIT = {
    "max_duration_s": "--max-video-duration-s",
    "max_source_frames": "--max-video-duration-s",
    "max_pixels": "--max-video-pixels",
    "decode_timeout_s": "--video-decode-timeout-s",
}
"""The gateway flag behind each dvd.video limit, named in refusals."""


class VideoLoader:
    """Loads, decodes and samples videos; owned by the app's state."""

    def __init__(
        self,
        config: GatewayConfig,
        fetcher: MediaFetcher | None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.fetcher = fetcher
        self.metrics = metrics
        self.limits = config.video_limits()
        self.slots = asyncio.Semaphore(config.max_concurrent_video_decodes)

    async def load(self, url: str, param: str) -> language_pb2.VideoFrames:
        """The sampled frames of the video behind `url`."""
        data = await self.fetch(url, param)
        await self.slots.acquire()
        started = time.perf_counter()
        decoding = asyncio.ensure_future(asyncio.to_thread(sample_video, data, self.limits))

        def decoded(future: asyncio.Future[SampledVideo]) -> None:
            # The slot is the thread's, not this request's: a client that goes away cancels
            # the wait, while the decode runs on (up to its time limit) and holds the slot.
            self.slots.release()
            if self.metrics is not None:
                self.metrics.video_decode_seconds.observe(time.perf_counter() - started)
            if not future.cancelled():
                future.exception()  # retrieved here when nobody waits for it any more

        decoding.add_done_callback(decoded)
        try:
            video = await asyncio.shield(decoding)
        except VideoError as exc:
            self._count("refused")
            raise refusal(exc, param) from None
        self._count("ok")
        if self.metrics is not None:
            self.metrics.video_frames.inc(len(video.frames))
        return to_wire(video)

    async def fetch(self, url: str, param: str) -> bytes:
        """The video file's bytes, from a data: URL or (when allowed) an http(s) fetch."""
        return await load_media(url, video_kind(self.config), self.fetcher, param)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.videos.labels(outcome=outcome).inc()


def refusal(exc: VideoError, param: str) -> ApiError:
    """A dvd.video refusal as the client's 400: the field, the reason, the flag."""
    flag = FLAG_OF_LIMIT.get(exc.limit or "")
    hint = f" (gateway flag {flag})" if flag else ""
    code = "video_too_large" if exc.limit else "invalid_video"
    return ApiError(400, f"{param}: {exc.message}{hint}", param=param, code=code)


def to_wire(video: SampledVideo) -> language_pb2.VideoFrames:
    return language_pb2.VideoFrames(
        frames=video.frames,
        timestamps_s=video.timestamps_s,
        frame_indices=video.frame_indices,
        source_fps=video.source_fps,
        source_frames=video.source_frames,
        duration_s=video.duration_s,
    )
