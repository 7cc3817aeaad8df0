"""Decoding a video file and sampling its frames, under limits (PyAV, i.e. FFmpeg's libraries).

`sample_video(data, limits)` turns a video file's bytes into the frames a model sees: each an
RGB image re-encoded as PNG (lossless, so a frame is exactly what the decoder produced),
with its presentation time. Two passes over the bytes, both in memory:

1. Demux only (no decoding): the video stream's packets give its frame count and frame
   times, so duration and the number of frames are checked before any pixel is decoded.
2. Decode from the start and keep the sampled frames; the others are decoded (a frame
   depends on earlier ones) but never converted to RGB. Frames are turned upright as the
   stream's display matrix says (quarter turns), as players and vLLM's OpenCV decoder do.

Sampling follows vLLM's uniform sampler: n = min(max_frames, floor(duration * fps), frames in
the video), at least 1 (fps 0: no rate cap, as vLLM's default); the frames taken are
`round(linspace(0, frames - 1, n))`, so the first and the last frame are always in.

Limits (`VideoLimits`): the duration, the frames in the file (a tiny-frame, high-rate video
would otherwise make decoding long), each frame's width * height, and the wall time of the
whole decode, checked between packets, so a malformed file cannot keep a thread busy past
it. Every refusal is a `VideoError` whose `limit` names the setting that refused it (None for
a file that is not a usable video).

Only container formats in `DEMUXERS` are probed, and FFmpeg may open no other resource:
playlist formats (HLS, concat, ...) that make FFmpeg read further URLs or local files are
never considered, whatever the bytes claim to be.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska,webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "ogg",
    "gif",
)
"""FFmpeg demuxers a video may be in: MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg, GIF."""

OPEN_OPTIONS = {
    "format_whitelist": ",".join(DEMUXERS),
    # Nothing beyond the bytes given: no protocol matches this name.
    "protocol_whitelist": "dvd-none",
}
ROTATIONS = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}
"""Counter-clockwise quarter turns; other angles are left as decoded."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of the frames' PNGs: fast; about 2x the bytes of level 6 at a fifth of the time."""


@dataclass(frozen=True)
class VideoLimits:
    """How frames are sampled and what a video may be; values checked by their owner's
    config (gateway.config)."""

    fps: float = 2.0
    """Frames sampled per second of video; 0: no rate cap (max_frames over the whole video)."""
    max_frames: int = 32
    """Most frames sampled from one video."""
    max_duration_s: float = 300.0
    """Longest video accepted, in seconds."""
    max_pixels: int = 1920 * 1080
    """Largest frame accepted, in width * height pixels."""
    max_source_fps: float = 240.0
    """Frame rate the frame-count limit allows: a video may hold at most
    max_duration_s * max_source_fps frames (decoding time grows with them)."""
    decode_timeout_s: float = 60.0
    """Wall time for both passes over one video."""

    @property
    def max_source_frames(self) -> int:
        return max(1, int(self.max_duration_s * self.max_source_fps))


class VideoError(ValueError):
    """A video refused: `limit` names the VideoLimits field that refused it, None when the
    data is not a usable video."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit


@dataclass(frozen=True)
class SampledVideo:
    """The frames taken from one video, in time order, and what the video was."""

    frames: list[bytes]
    """PNG files, RGB, at the video's resolution."""
    timestamps_s: list[float]
    """Each frame's presentation time from the video's first frame."""
    frame_indices: list[int]
    """Each frame's index among the video's frames (presentation order)."""
    source_fps: float
    source_frames: int
    duration_s: float
    width: int
    height: int
    format: str
    codec: str


def sample_indices(total: int, duration_s: float, fps: float, max_frames: int) -> list[int]:
    """Which of `total` frames to take: vLLM's uniform choice (see the module docstring)."""
    if total < 1:
        return []
    n = min(total, max_frames)
    if fps > 0:
        n = min(n, math.floor(duration_s * fps + 1e-9))
    n = max(1, n)
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)
    return [math.floor(i * step + 0.5) for i in range(n)]


class _Clock:
    def __init__(self, limits: VideoLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.decode_timeout_s

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise VideoError(
                f"decoding the video took longer than {self.limits.decode_timeout_s:g} s",
                limit="decode_timeout_s",
            )


def sample_video(data: bytes, limits: VideoLimits) -> SampledVideo:
    """The sampled frames of the video in `data`; VideoError when it is refused."""
    import av

    clock = _Clock(limits)
    try:
        probe = _probe(data, limits, clock)
        return _decode(data, probe, limits, clock)
    except VideoError:
        raise
    except av.FFmpegError as exc:
        raise VideoError(f"the video cannot be decoded: {_ffmpeg_reason(exc)}") from None
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        raise VideoError(f"the video cannot be decoded: {exc}") from None


@dataclass(frozen=True)
class _Probe:
    keys: list[int]
    """Each frame's pts in presentation order, or decode positions when the file has none."""
    by_pts: bool
    time_base: float
    fps: float
    duration_s: float
    format: str
    codec: str


def _open(data: bytes) -> Any:
    import av

    try:
        return av.open(io.BytesIO(data), mode="r", options=dict(OPEN_OPTIONS))
    except av.FFmpegError as exc:
        raise VideoError(
            f"the data is not a video in a known container format ({_ffmpeg_reason(exc)}); "
            "send MP4, WebM/Matroska, MOV, AVI, MPEG-TS, FLV, Ogg or GIF"
        ) from None


def _video_stream(container: Any, limits: VideoLimits) -> Any:
    if not container.streams.video:
        raise VideoError("the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise VideoError(
            f"the video's frames ({width}x{height}) have more than the limit of "
            f"{limits.max_pixels} pixels",
            limit="max_pixels",
        )
    return stream


def _probe(data: bytes, limits: VideoLimits, clock: _Clock) -> _Probe:
    with _open(data) as container:
        stream = _video_stream(container, limits)
        if container.duration and container.duration / 1e6 > limits.max_duration_s + 1e-3:
            raise _too_long(container.duration / 1e6, limits)
        pts: list[int | None] = []
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            pts.append(packet.pts)
            if len(pts) > limits.max_source_frames:
                raise VideoError(
                    f"the video has more than {limits.max_source_frames} frames "
                    f"({limits.max_duration_s:g} s at {limits.max_source_fps:g} fps)",
                    limit="max_source_frames",
                )
            if len(pts) % 64 == 0:
                clock.check()
        if not pts:
            raise VideoError("the video stream has no frames")
        time_base = float(stream.time_base) if stream.time_base else 0.0
        by_pts = all(p is not None for p in pts) and time_base > 0
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if by_pts:
            keys = sorted(p for p in pts if p is not None)
            span = (keys[-1] - keys[0]) * time_base
            if fps <= 0 and len(keys) > 1 and span > 0:
                fps = (len(keys) - 1) / span
            duration = span + (1 / fps if fps > 0 else 0.0)
        else:
            keys = list(range(len(pts)))
            if fps <= 0:
                raise VideoError("the video's frame times are unknown (no timestamps, no rate)")
            duration = len(keys) / fps
        if duration > limits.max_duration_s + 1e-3:
            raise _too_long(duration, limits)
        return _Probe(
            keys=keys,
            by_pts=by_pts,
            time_base=time_base,
            fps=fps,
            duration_s=duration,
            format=container.format.name,
            codec=stream.codec_context.name,
        )


def _decode(data: bytes, probe: _Probe, limits: VideoLimits, clock: _Clock) -> SampledVideo:
    indices = sample_indices(len(probe.keys), probe.duration_s, limits.fps, limits.max_frames)
    targets = [probe.keys[i] for i in indices]
    taken: list[Any] = []  # av.VideoFrame per target, in order
    last = None
    with _open(data) as container:
        stream = _video_stream(container, limits)
        stream.thread_type = "AUTO"
        position = 0
        for packet in container.demux(stream):
            clock.check()
            for frame in packet.decode():
                key = frame.pts if probe.by_pts and frame.pts is not None else position
                position += 1
                if frame.width * frame.height > limits.max_pixels:
                    raise VideoError(
                        f"a frame of the video ({frame.width}x{frame.height}) has more than "
                        f"the limit of {limits.max_pixels} pixels",
                        limit="max_pixels",
                    )
                # The first frame at or after each target time stands for it.
                while len(taken) < len(targets) and targets[len(taken)] <= key:
                    taken.append(frame)
                last = frame
            if len(taken) == len(targets):
                break
    if last is None:
        raise VideoError("no frame of the video could be decoded")
    taken += [last] * (len(targets) - len(taken))  # frames lost at the end of a damaged file
    frames = []
    for frame in taken:
        clock.check()
        frames.append(_png(frame))
    first = probe.keys[0]
    if probe.by_pts:
        stamps = [(k - first) * probe.time_base for k in targets]
    else:
        stamps = [k / probe.fps for k in targets]
    turned = round((taken[0].rotation or 0) / 90) % 2 == 1
    width, height = (
        (taken[0].height, taken[0].width) if turned else (taken[0].width, taken[0].height)
    )
    return SampledVideo(
        frames=frames,
        timestamps_s=stamps,
        frame_indices=indices,
        source_fps=probe.fps,
        source_frames=len(probe.keys),
        duration_s=probe.duration_s,
        width=width,
        height=height,
        format=probe.format,
        codec=probe.codec,
    )


def _png(frame: Any) -> bytes:
    out = io.BytesIO()
    _upright(frame).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def _upright(frame: Any) -> Image.Image:
    """The frame as RGB, turned as its display matrix says (a phone's portrait video is
    stored sideways), as players, FFmpeg and OpenCV (vLLM's decoder) show it. PyAV's
    `rotation` is counter-clockwise, like PIL's transposes."""
    image = frame.to_image()
    turn = ROTATIONS.get(round((frame.rotation or 0) / 90) * 90 % 360)
    return image.transpose(turn) if turn is not None else image


def _too_long(duration_s: float, limits: VideoLimits) -> VideoError:
    return VideoError(
        f"the video lasts {duration_s:.1f} s, longer than the limit of {limits.max_duration_s:g} s",
        limit="max_duration_s",
    )


def _ffmpeg_reason(exc: Exception) -> str:
    return str(getattr(exc, "strerror", None) or exc)
