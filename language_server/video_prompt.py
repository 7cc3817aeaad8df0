"""Videos in InternVL prompts: each sampled frame is an image of one tile, labelled.

The gateway sends a video as its sampled frames (`VideoFrames`: PNG frames and their times).
InternVL has no video tokens of its own: its video inference (the model card's `load_video`)
feeds every frame as one 448-px tile (no dynamic tiling, no thumbnail) and writes

    Frame1: <image>
    Frame2: <image>
    ...

before the question, one `<image>` per frame, each expanded like any image's to `<img>` +
`<IMG_CONTEXT>` x rows + `</img>`. So here a video part becomes that text with one image slot
per frame, and its frames go to the vision server as images whose `max_tiles` is 1, in
prompt order with the request's other images.

Qwen3-VL instead encodes a video as ONE item (its frames paired into temporal patches, its
times written into the prompt): its builder passes `clip`, and the video travels as one
`VideoClip` (language_server/qwen3vl_prompt.py).

A request's images and frames may be more than one Encode call takes (the vision server's
--max-images-per-request): `encode_visual` then splits them into calls run at once and
joins their features in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dvd.deadline import Deadline
from dvd.errors import InvalidInput
from dvd.v1 import language_pb2
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages, FeatureSource, VideoClip, VisualItem

FRAME_TILES = 1
"""Tiles per video frame: InternVL's load_video uses max_num=1."""
MAX_FRAMES_PER_REQUEST = 512
"""Frames one request may carry over all its videos (the gateway samples at most
--max-video-frames x --max-videos-per-request)."""


@dataclass(frozen=True)
class VisualInput:
    """One item for the vision server: a picture's or a video frame's encoded bytes, or a
    whole video (`clip`, Qwen3-VL)."""

    data: bytes
    max_tiles: int = 0
    """0: the vision server's own bound (dynamic tiling); FRAME_TILES for video frames."""
    is_frame: bool = False
    clip: VideoClip | None = None

    @property
    def item(self) -> VisualItem:
        return self.clip if self.clip is not None else self.data

    @property
    def frames(self) -> int:
        """Video frames this input carries."""
        return len(self.clip.frames) if self.clip is not None else int(self.is_frame)


def frame_prompt(num_frames: int, slot: str) -> str:
    """InternVL's text for a video of `num_frames` frames, `slot` standing for each frame's
    image; the parts of a message are joined with newlines, so the question that follows a
    video starts on its own line, as in InternVL's "Frame1: <image>\\n...FrameN: <image>\\n"."""
    return "\n".join(f"Frame{i}: {slot}" for i in range(1, num_frames + 1))


def visual_inputs(
    messages: Sequence[language_pb2.ChatMessage],
    max_images: int,
    clip: Callable[[language_pb2.VideoFrames], VideoClip] | None = None,
) -> list[VisualInput]:
    """The request's images and videos in prompt order, checked against the limits: each
    video's frames as images of one tile (InternVL), or, given `clip`, each video as one
    item that `clip` makes (Qwen3-VL)."""
    inputs: list[VisualInput] = []
    for message in messages:
        for part in message.content:
            kind = part.WhichOneof("kind")
            if kind == "image":
                inputs.append(VisualInput(part.image))
            elif kind == "video":
                check_video(part.video)
                if clip is not None:
                    inputs.append(VisualInput(b"", clip=clip(part.video)))
                else:
                    inputs += [
                        VisualInput(f, FRAME_TILES, is_frame=True) for f in part.video.frames
                    ]
    images = sum(not i.is_frame and i.clip is None for i in inputs)
    if images > max_images:
        raise InvalidInput(f"{images} images in one request; the limit is {max_images}")
    frames = sum(i.frames for i in inputs)
    if frames > MAX_FRAMES_PER_REQUEST:
        raise InvalidInput(
            f"{frames} video frames in one request; the limit is {MAX_FRAMES_PER_REQUEST}"
        )
    return inputs


def check_video(video: language_pb2.VideoFrames) -> None:
    if not video.frames:
        raise InvalidInput("a video part has no frames")
    if len(video.timestamps_s) not in (0, len(video.frames)):
        raise InvalidInput(
            f"a video part has {len(video.frames)} frames but {len(video.timestamps_s)} timestamps"
        )


async def encode_visual(
    source: FeatureSource,
    request_id: str,
    inputs: list[VisualInput],
    mode: VirMode | None,
    deadline: Deadline,
    per_call: int,
) -> EncodedImages:
    """Features of `inputs`, in order: one Encode call when they fit in `per_call` images
    (every image-only request), else calls of at most `per_call` run concurrently."""
    calls = [inputs[i : i + per_call] for i in range(0, len(inputs), max(1, per_call))]
    tasks = [
        asyncio.ensure_future(
            source.encode(
                request_id if len(calls) == 1 else f"{request_id}-v{n}",
                [i.item for i in call],
                mode,
                deadline,
                max_tiles=[i.max_tiles for i in call],
            )
        )
        for n, call in enumerate(calls)
    ]
    try:
        parts = list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
            # A call may finish before its cancel lands: whenever each ends, free what it
            # holds (and retrieve its error, so that none goes unreported).
            task.add_done_callback(_release_if_encoded)
        raise
    return parts[0] if len(parts) == 1 else join(parts)


def _release_if_encoded(task: asyncio.Future[EncodedImages]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()


def join(parts: list[EncodedImages]) -> EncodedImages:
    """Several calls' features as one request's: in order; stage times of calls that ran at
    once are the longest of them, their release frees them all."""

    def release() -> None:
        for part in parts:
            part.release()

    return EncodedImages(
        features=[f for part in parts for f in part.features],
        tokens_per_tile=[t for part in parts for t in part.tokens_per_tile],
        grids=[g for part in parts for g in part.grids],
        content_keys=[k for part in parts for k in part.content_keys],
        timestamps=[t for part in parts for t in part.timestamps],
        preprocess_ns=max(p.preprocess_ns for p in parts),
        queue_ns=max(p.queue_ns for p in parts),
        encode_ns=max(p.encode_ns for p in parts),
        transfer_ns=max(p.transfer_ns for p in parts),
        server=",".join(dict.fromkeys(p.server for p in parts if p.server)),
        release=release,
    )
