"""A Qwen3-VL video as one item: its sampled frames (encoded images) and their times.

Qwen3-VL encodes a video as ONE item whose temporal patches pair consecutive frames (the
last frame repeated to fill an odd count, `preprocess_video`), so the frames of a video are
never split into images: the vision server (and coupled mode) decode them together, size
them by the video budgets over all frames, and key the item on every frame and time.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Sequence

from PIL import Image

from dvd.errors import InvalidInput
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_video, video_grid
from vision_server.qwen3vl.processor_config import VideoProcessorConfig
from vision_server.tiling import decode_image

MAX_FRAMES = 768
"""Most frames in one video item (Qwen3VLVideoProcessor's max_frames)."""


def clip(frames: Sequence[bytes], timestamps: Sequence[float]) -> tuple[list[bytes], list[float]]:
    """The frames and times checked; a one-frame video doubled, since Qwen3-VL's processor
    refuses a clip shorter than one temporal patch while it pads any odd count by repeating
    the last frame: one frame becomes one temporal patch of that frame."""
    if not frames:
        raise InvalidInput("a video has no frames")
    if len(timestamps) != len(frames):
        raise InvalidInput(f"a video has {len(frames)} frames but {len(timestamps)} timestamps")
    if len(frames) > MAX_FRAMES:
        raise InvalidInput(f"a video has {len(frames)} frames; the limit is {MAX_FRAMES}")
    if len(frames) == 1:
        return [frames[0]] * 2, [timestamps[0]] * 2
    return list(frames), [float(t) for t in timestamps]


def preprocess_clip(
    frames: Sequence[bytes],
    timestamps: Sequence[float],
    config: VideoProcessorConfig,
    max_frame_pixels: int,
) -> VisionInput:
    """Decodes every frame (each within `max_frame_pixels`) and preprocesses the clip:
    patches, grid (t, h, w) and one time per temporal patch."""
    frames, timestamps = clip(frames, timestamps)
    decoded = [decode_image(frame, max_frame_pixels) for frame in frames]
    return preprocess_video(decoded, timestamps, config)


def clip_grid(frames: Sequence[bytes], config: VideoProcessorConfig) -> tuple[int, int, int] | None:
    """The grid `preprocess_clip` will give, from the first frame's header (a clip's frames
    share one size); None when that header cannot be read or the size is refused (decoding
    reports it later)."""
    if not frames:
        return None
    try:
        with Image.open(io.BytesIO(frames[0])) as probe:
            width, height = probe.size
        return video_grid(max(len(frames), 2), height, width, config)
    except Exception:
        return None


def clip_content_key(frames: Sequence[bytes], timestamps: Sequence[float], salt: bytes) -> str:
    """The video's content key: every frame's bytes and time (the times are written into the
    prompt, so two clips with the same frames at other times are other items)."""
    digest = hashlib.blake2b(b"video", digest_size=16)
    for frame, seconds in zip(frames, timestamps, strict=True):
        digest.update(struct.pack("<qd", len(frame), float(seconds)))
        digest.update(frame)
    digest.update(salt)
    return digest.hexdigest()
