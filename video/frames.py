"""Video frames: decoding with PyAV, uniform and fps-based sampling, a per-dataset frame cache.

A :class:`Clip` holds the sampled frames of one video as a ``uint8`` tensor ``(T, C, H, W)`` with the
indices they were taken from and the source frame rate; ``clip.pil()`` gives the PIL frames and
``clip.metadata()`` the dict transformers' ``VideoMetadata`` takes (``total_num_frames``, ``fps``,
``frames_indices``), from which Qwen2.5-VL derives ``second_per_grid_ts``. Both forms go straight to a
transformers video processor (``processor(text=..., videos=[clip.frames], video_metadata=[...])``).

Sampling (:class:`FrameSampling`):

* ``num_frames=N``: ``N`` frames spread uniformly, first and last included
  (:func:`mmalign.corruptions.fewer_frames_indices`: ``round(linspace(0, T - 1, N))``; the middle frame for
  ``N = 1``); a video with fewer than ``N`` frames gives all of them.
* ``fps=f``: one frame every ``1/f`` seconds from the start (``t = k / f``, frame ``round(t * video_fps)``),
  thinned uniformly to ``max_frames`` when given.
* ``multiple_of=2``: drop trailing frames so the count is even (Qwen2-VL/2.5-VL merge frames in temporal
  patches of 2; their processor otherwise repeats the last frame).

Decoding seeks instead of decoding every frame: for each wanted frame further than ``seek_gap`` frames (and
than the keyframe spacing learnt while decoding) ahead of the decoder, PyAV seeks to the keyframe before it
and decodes forward to it; nearer frames are reached by decoding on. :class:`DecodeStats` counts seeks and decoded frames (tests check a sparse sample
of a long clip decodes a fraction of it). PyAV is the optional ``video`` extra (``pip install
'mmalign[video]'``); without it decoding raises an ``ImportError`` that says so. A media entry may also be
a list of image files (the frames of one video, e.g. LLaVA-Hound's extracted frames): sampling then picks
among them.

Bad videos raise :class:`~mmalign.pairs.MediaError` naming the file: missing, empty, not a video (or no
video stream), a codec this FFmpeg cannot decode, corrupt or truncated (the stream ends well before the
frames asked for), or fewer frames than ``num_frames`` (``short_clips="error"``; ``"keep"`` takes all it
has). :func:`check_videos` samples every clip of a pair dataset before training and names the pair, line
and field of each bad one, or skips and counts them (``skip_bad``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.corruptions import fewer_frames_indices
from mmalign.pairs import MediaError, load_image

__all__ = [
    "SHORT_CLIPS",
    "VIDEO_EXTENSIONS",
    "Clip",
    "DecodeStats",
    "FrameCache",
    "FrameSampling",
    "VideoInfo",
    "check_videos",
    "decode_frames",
    "fps_indices",
    "is_video_file",
    "load_clip",
    "pair_media",
    "pair_sampling",
    "probe",
    "require_av",
    "write_video",
]

SHORT_CLIPS: tuple[str, ...] = ("error", "keep")
"""What a clip with fewer frames than ``num_frames`` gives: an error naming it, or every frame it has."""

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".flv")


def is_video_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a video extension (:data:`VIDEO_EXTENSIONS`, case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av() -> Any:
    """Import PyAV, or raise an ``ImportError`` naming the extra that installs it."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding videos needs PyAV: pip install 'mmalign[video]' (or pip install av)"
        ) from exc
    return av


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video to use (hashable: it is part of the frame-cache key).

    Args:
        num_frames: frames spread uniformly over the video (first and last included); 16 when neither
            ``num_frames`` nor ``fps`` is given.
        short_clips: a video with fewer frames than ``num_frames``: ``"error"`` (a :class:`MediaError`
            naming the file and both counts) or ``"keep"`` (every frame it has).
        fps: alternatively, frames per second of video time (give one of ``num_frames``/``fps``).
        max_frames: with ``fps``, thin to at most this many frames (uniformly).
        multiple_of: drop trailing frames so the count is a multiple (2 for Qwen2-VL's temporal patches);
            a clip with fewer frames than ``multiple_of`` keeps them all.
        max_side: shrink decoded frames (area interpolation, aspect kept) so the longer side is at most this;
            the processor resizes to its own size anyway, so e.g. 448 for a 384 px model keeps 1080p clips
            from filling the frame cache (None: frames as decoded).
    """

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    multiple_of: int = 1
    max_side: int | None = None
    short_clips: str = "error"

    def __post_init__(self) -> None:
        if self.short_clips not in SHORT_CLIPS:
            raise ValueError(f"FrameSampling.short_clips must be one of {list(SHORT_CLIPS)}, got {self.short_clips!r}")
        if self.num_frames is None and self.fps is None:
            object.__setattr__(self, "num_frames", 16)
        if self.num_frames is not None and self.fps is not None:
            raise ValueError(
                f"FrameSampling: give exactly one of num_frames or fps (got {self.num_frames}, {self.fps})"
            )
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"FrameSampling.num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"FrameSampling.fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"FrameSampling.max_frames must be >= 1, got {self.max_frames}")
        if self.multiple_of < 1:
            raise ValueError(f"FrameSampling.multiple_of must be >= 1, got {self.multiple_of}")
        if self.max_side is not None and self.max_side < 2:
            raise ValueError(f"FrameSampling.max_side must be >= 2 or None, got {self.max_side}")

    def indices(self, total_frames: int, video_fps: float | None) -> list[int]:
        """Frame indices (sorted, distinct) to take from a video of ``total_frames`` at ``video_fps``.

        Raises:
            MediaError: no frames, or fewer than ``num_frames`` with ``short_clips="error"``.
        """
        if total_frames < 1:
            raise MediaError(f"the video has no frames ({total_frames})")
        if self.num_frames is not None and total_frames < self.num_frames and self.short_clips == "error":
            raise MediaError(
                f"the video has {total_frames} frame(s), fewer than the {self.num_frames} asked for (num_frames); "
                "sample fewer frames or set short_clips='keep' to use every frame it has"
            )
        if self.num_frames is not None:
            out = fewer_frames_indices(total_frames, min(self.num_frames, total_frames))
        else:
            if video_fps is None:
                raise ValueError("FrameSampling(fps=...) needs the video's frame rate; frame lists have none")
            out = fps_indices(total_frames, video_fps, float(self.fps), self.max_frames)  # type: ignore[arg-type]
        if len(out) >= self.multiple_of:
            out = out[: len(out) - len(out) % self.multiple_of]
        return out


def fps_indices(total_frames: int, video_fps: float, fps: float, max_frames: int | None = None) -> list[int]:
    """Frames at ``t = k / fps`` seconds (``k = 0, 1, ...`` within the video), as indices at ``video_fps``.

    Example: a 2 s video at 24 fps sampled at 2 fps -> ``[0, 12, 24, 36]``. With ``max_frames`` the list is
    thinned uniformly (:func:`~mmalign.corruptions.fewer_frames_indices` over its positions).
    """
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"fps_indices: frame rates must be > 0 (video {video_fps}, sampling {fps})")
    step = video_fps / fps
    out: list[int] = []
    k = 0
    while True:
        idx = int(np.floor(k * step + 0.5))
        if idx > total_frames - 1:
            break
        if not out or idx != out[-1]:
            out.append(idx)
        k += 1
    if max_frames is not None and len(out) > max_frames:
        out = [out[i] for i in fewer_frames_indices(len(out), max_frames)]
    return out


@dataclass
class VideoInfo:
    """What :func:`probe` reads from a container's first video stream."""

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int


@dataclass
class DecodeStats:
    """Counters of :func:`decode_frames`: container seeks and frames decoded (summed over calls)."""

    seeks: int = 0
    decoded: int = 0
    videos: int = 0


@dataclass
class Clip:
    """Sampled frames of one video.

    Attributes:
        frames: ``uint8`` tensor ``(T, C, H, W)``, RGB.
        indices: source frame index of each frame, ``len(indices) == T``.
        total_frames: frames in the source video (or in the frame list).
        fps: source frame rate, ``None`` for a list of frame images.
        source: the file (or first frame file) it came from.
    """

    frames: torch.Tensor
    indices: list[int]
    total_frames: int
    fps: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[1] != 3 or self.frames.dtype != torch.uint8:
            raise ValueError(
                f"Clip.frames must be uint8 (T, 3, H, W), got {self.frames.dtype} {tuple(self.frames.shape)}"
            )
        if len(self.indices) != self.frames.shape[0]:
            raise ValueError(f"Clip: {len(self.indices)} indices for {self.frames.shape[0]} frames")

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def pil(self) -> list[Image.Image]:
        """The frames as RGB PIL images."""
        return [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in self.frames]

    def metadata(self) -> dict[str, Any]:
        """Keyword values of transformers' ``VideoMetadata`` for these frames (fps 24 when unknown).

        Qwen2.5-VL turns them into ``second_per_grid_ts = temporal_patch_size / sampled_fps`` with
        ``sampled_fps = len(frames_indices) / total_num_frames * fps``.
        """
        fps = self.fps if self.fps is not None else 24.0
        return {
            "total_num_frames": int(self.total_frames),
            "fps": float(fps),
            "duration": float(self.total_frames / fps),
            "frames_indices": [int(i) for i in self.indices],
        }

    def with_frames(self, frames: torch.Tensor, indices: Sequence[int] | None = None) -> Clip:
        """A copy with other frames (a hacked clip: fewer frames, lower resolution), same source timing."""
        return Clip(frames, list(self.indices if indices is None else indices), self.total_frames, self.fps, self.source)

    @property
    def nbytes(self) -> int:
        return int(self.frames.numel())


def _open(path: Path) -> Any:
    av = require_av()
    if not path.is_file():
        raise MediaError(f"video {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise MediaError(f"video {str(path)!r} is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except Exception as exc:  # av.error.* (invalid data, unknown format)
        raise MediaError(f"cannot open video {str(path)!r} (not a video, or damaged): {exc}") from exc
    if not container.streams.video:
        container.close()
        raise MediaError(f"{str(path)!r} has no video stream (not a video, or a truncated file)")
    if container.streams.video[0].codec_context is None:  # the container names a codec FFmpeg cannot decode
        container.close()
        raise MediaError(f"the video codec of {str(path)!r} is not supported by this FFmpeg build (PyAV {av.__version__})")
    return container


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError("the video stream has no frame rate")
    return float(rate)


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, frame rate, duration and size of the first video stream of ``path`` (no decoding).

    The frame count is the container's when it records one, else ``round(duration * fps)``.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        frames = int(stream.frames or 0) or int(round(duration * fps))
        if frames < 1:
            raise MediaError(f"cannot tell how many frames {str(path)!r} has")
        ctx = stream.codec_context
        return VideoInfo(str(path), frames, fps, duration or frames / fps, int(ctx.width), int(ctx.height))
    finally:
        container.close()


def _ends_early(last: Any, stream: Any, container: Any, fps: float) -> bool:
    """Whether the last decoded frame ends well before the duration the container declares (a truncated or
    damaged stream), rather than lasting to it (a variable-frame-rate clip whose last frame is long)."""
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / 1_000_000
    else:
        return True  # nothing to tell them apart: the frame count alone says frames are missing
    if last.pts is None or stream.time_base is None:
        return True
    shown = float(last.duration * stream.time_base) if getattr(last, "duration", None) else 1 / fps
    end = float((last.pts - (stream.start_time or 0)) * stream.time_base) + shown
    return end < declared - max(1.5 / fps, 0.05 * declared)


def decode_frames(
    path: str | os.PathLike[str],
    indices: Sequence[int],
    *,
    seek_gap: int = 16,
    max_side: int | None = None,
    stats: DecodeStats | None = None,
) -> torch.Tensor:
    """Decode the frames ``indices`` of ``path``: ``uint8 (len(indices), 3, H, W)`` in the order given.

    Seeks to the keyframe before each wanted frame that lies more than ``seek_gap`` frames, and more than
    the keyframe spacing seen so far, past the last decoded one; decodes forward otherwise (in a stream
    with keyframes every 250 frames a seek to a frame 60 ahead would land behind the decoder). A frame index is ``round((pts - start) * time_base *
    fps)``: on a variable-frame-rate stream (``fps`` is then the average rate) index ``i`` means the frame
    shown at ``i / fps`` seconds, which is what the clip's metadata tells the model. An index past the last
    decodable frame gives the last frame when that frame lasts to the container's declared duration (a long
    last frame) or the index is at most ``max(2, 5%)`` past it (a container that over-reports its length);
    otherwise the stream ended early and it is an error (a truncated or damaged file). A seek that lands past its target (inexact container index) or frames without
    timestamps make it decode from the start without further seeks. ``max_side`` shrinks each kept frame
    (area interpolation, aspect kept, sides even) so its longer side is at most ``max_side``.

    Raises:
        MediaError: the file is missing, empty, not a video, in a codec FFmpeg cannot decode, yields no
            frame, or ends well before the frames asked for.
    """
    stats = stats if stats is not None else DecodeStats()
    path = Path(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("decode_frames: no frame indices")
    if wanted[0] < 0:
        raise ValueError(f"decode_frames: negative frame index {wanted[0]}")
    container = _open(path)
    found: dict[int, np.ndarray] = {}
    last: Any = None
    try:
        stream = container.streams.video[0]
        # frame threads decode ahead, and a seek throws that work away: sparse (seeking) reads use slice threads
        dense = wanted[-1] - wanted[0] <= seek_gap * len(wanted)
        stream.thread_type = "AUTO" if dense else "SLICE"
        fps = _stream_fps(stream)
        time_base = stream.time_base
        start = stream.start_time or 0
        ctx = stream.codec_context
        size: dict[str, Any] = {}
        if max_side is not None and max(ctx.width, ctx.height) > max_side:
            scale = max_side / max(ctx.width, ctx.height)
            size = {"width": max(2, int(ctx.width * scale) // 2 * 2), "height": max(2, int(ctx.height * scale) // 2 * 2),
                    "interpolation": "AREA"}
        frames_iter: Any = None
        position = -1  # index of the last decoded frame
        counter = 0  # fallback index for frames without pts
        sought = -1  # the target of the last seek (seek once per target: the keyframe may lie far before it)
        can_seek, fresh = True, False  # fresh: the next frame is the first after a seek
        gop, last_key = 0, None  # keyframe spacing learnt so far; the last keyframe of the current run
        pending = list(wanted)
        while pending:
            target = pending[0]
            if frames_iter is None or (can_seek and target > position + max(seek_gap, gop) and target != sought):
                if target > 0 and (frames_iter is not None or target > seek_gap):
                    ts = start + int(round(target / fps / float(time_base)))
                    container.seek(ts, stream=stream, backward=True, any_frame=False)
                    stats.seeks += 1
                    sought, fresh, last_key, before = target, True, None, position
                frames_iter = container.decode(stream)
            frame = next(frames_iter, None)
            if frame is None:  # end of stream: remaining targets get the last frame
                if last is None:
                    raise MediaError(f"no frame could be decoded from {str(path)!r}")
                if pending[-1] - position > max(2, pending[-1] // 20) and _ends_early(last, stream, container, fps):
                    raise MediaError(
                        f"{str(path)!r} ends at frame {position} but frame {pending[-1]} was asked for: the file is "
                        "truncated or damaged (or its container over-reports its length)"
                    )
                for t in pending:
                    found[t] = last.to_ndarray(format="rgb24", **size)
                break
            stats.decoded += 1
            if frame.pts is None:
                position = counter
            else:
                position = int(round(float((frame.pts - start) * time_base) * fps))
            counter += 1
            if fresh:
                fresh = False
                if frame.pts is None or position > target:
                    # the seek overshot (or frames carry no timestamps): decode from the start, no more seeks
                    container.seek(start, stream=stream, backward=True, any_frame=False)
                    stats.seeks += 1
                    frames_iter, can_seek, counter = container.decode(stream), False, 0
                    continue
                if position <= before:  # landed on a keyframe already passed: no keyframe up to the target
                    gop = max(gop, target - position)
            if frame.key_frame:  # a long-GOP stream is decoded on rather than sought in (a seek would go back)
                if last_key is not None:
                    gop = max(gop, position - last_key)
                last_key = position
            last = frame
            while pending and position >= pending[0]:
                found[pending.pop(0)] = frame.to_ndarray(format="rgb24", **size)
    except MediaError:
        raise
    except Exception as exc:  # av.error.* from a damaged stream
        raise MediaError(f"cannot decode {str(path)!r}: {exc}") from exc
    finally:
        container.close()
    stats.videos += 1
    first = found[int(indices[0])]
    out = torch.empty((len(indices), 3, *first.shape[:2]), dtype=torch.uint8)
    for row, i in enumerate(indices):  # one copy per frame, straight into (T, C, H, W)
        out[row] = torch.from_numpy(found[int(i)]).permute(2, 0, 1)
    return out


def load_clip(
    media: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    sampling: FrameSampling,
    *,
    stats: DecodeStats | None = None,
) -> Clip:
    """Sample a :class:`Clip` from a video file, or from a list of frame images (in order).

    A one-element list holding a video file is read as that file.
    """
    if not isinstance(media, str | os.PathLike):
        items = [Path(m) for m in media]
        if len(items) == 1 and is_video_file(items[0]):
            media = items[0]
        else:
            if not items:
                raise ValueError("load_clip: empty frame list")
            try:
                chosen = sampling.indices(len(items), None)
            except MediaError as exc:
                raise MediaError(f"frames of {str(items[0].parent)!r}: {exc}") from None
            images = [load_image(items[i]) for i in chosen]
            if sampling.max_side is not None:
                for image in images:
                    image.thumbnail((sampling.max_side, sampling.max_side), Image.BOX)
            frames = [np.asarray(image) for image in images]
            shapes = {f.shape for f in frames}
            if len(shapes) != 1:
                raise MediaError(f"frames of {str(items[0].parent)!r} differ in size: {sorted(shapes)}")
            tensor = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
            return Clip(tensor, chosen, len(items), None, str(items[0]))
    path = Path(media)
    info = probe(path)
    try:
        chosen = sampling.indices(info.num_frames, info.fps)
    except MediaError as exc:
        raise MediaError(f"video {str(path)!r}: {exc}") from None
    frames = decode_frames(path, chosen, max_side=sampling.max_side, stats=stats)
    return Clip(frames, chosen, info.num_frames, info.fps, str(path))


@dataclass
class FrameCache:
    """Sampled clips kept in memory, so each clip is decoded once per pass over a dataset.

    Keyed by the resolved media paths, their size and modification time, and the sampling; least recently
    used clips are evicted beyond ``max_bytes`` (default 2 GiB of ``uint8`` frames). ``hits``/``misses``
    count lookups; ``stats`` counts the decoding work behind the misses.
    """

    max_bytes: int = 2 << 30
    hits: int = 0
    misses: int = 0
    stats: DecodeStats = field(default_factory=DecodeStats)
    _clips: OrderedDict[tuple[Any, ...], Clip] = field(default_factory=OrderedDict, repr=False)
    _bytes: int = 0

    def get(self, media: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], sampling: FrameSampling) -> Clip:
        paths = [Path(media)] if isinstance(media, str | os.PathLike) else [Path(m) for m in media]
        key_parts: list[Any] = []
        for p in paths:
            st = p.stat() if p.exists() else None
            key_parts.append((str(p.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1))
        key = (tuple(key_parts), sampling)
        clip = self._clips.get(key)
        if clip is not None:
            self.hits += 1
            self._clips.move_to_end(key)
            return clip
        self.misses += 1
        clip = load_clip(media, sampling, stats=self.stats)
        self._clips[key] = clip
        self._bytes += clip.nbytes
        while self._bytes > self.max_bytes and len(self._clips) > 1:
            _, old = self._clips.popitem(last=False)
            self._bytes -= old.nbytes
        return clip

    def clear(self) -> None:
        self._clips.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._clips)


def write_video(
    path: str | os.PathLike[str],
    frames: torch.Tensor | np.ndarray,
    *,
    fps: float = 24.0,
    codec: str = "mpeg4",
    gop_size: int = 12,
    bit_rate: int | None = None,
) -> Path:
    """Encode frames to a video file with PyAV; returns ``path``.

    Args:
        frames: ``uint8`` ``(T, H, W, 3)`` array or ``(T, 3, H, W)`` tensor; even ``H`` and ``W`` (yuv420p).
        codec: an encoder PyAV has (``"mpeg4"`` is in every FFmpeg build; ``"libx264"`` when present).
        gop_size: frames between keyframes (seeking lands on keyframes).
    """
    av = require_av()
    array = frames.permute(0, 2, 3, 1).numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be uint8 (T, H, W, 3), got {array.dtype} {array.shape}")
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: height and width must be even for yuv420p, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop_size
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        for image in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ----------------------------------------------------------------------------------------------
# the videos of pairs, and the video check before training


def pair_media(pair: Any, side: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files of ``pair``'s ``side`` video (``"chosen"``/``"rejected"``; empty ``rejected_media`` means the
    chosen video), resolved against the pair's ``root``, else ``root``.

    Raises:
        ValueError: no media, or a relative path with no folder to resolve it against (or leaving it).
    """
    from mmalign.pairs import pair_media_path

    media = list(getattr(pair, f"{side}_media") or []) or list(pair.chosen_media or [])
    if not media:
        raise ValueError(f"pair {pair.id!r} has no video ({side}_media and chosen_media are empty)")
    return [pair_media_path(pair, item, f"{side}_media", root) for item in media]


def pair_sampling(pair: Any, side: str, sampling: FrameSampling) -> FrameSampling:
    """``sampling``, or the pair's ``meta["sampling"][side]`` (frame choice only: ``max_side``, ``multiple_of``
    and ``short_clips`` stay ``sampling``'s unless given)."""
    override = ((pair.meta or {}).get("sampling") or {}).get(side)
    if not override:
        return sampling
    base = {"max_side": sampling.max_side, "multiple_of": sampling.multiple_of, "short_clips": sampling.short_clips}
    try:
        return FrameSampling(**{**base, **override})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pair {pair.id!r}: bad meta['sampling'][{side!r}] {override!r}: {exc}") from exc


def check_videos(
    dataset: Any,
    sampling: FrameSampling,
    *,
    media_root: str | os.PathLike[str] | None = None,
    cache: FrameCache | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> Any:
    """Sample every video of a pair dataset once, before training (the video counterpart of
    :func:`mmalign.pairs.check_media`), and name each bad one.

    ``dataset``: a :class:`~mmalign.pairs.PairDataset` or pairs. Each side's clip is sampled as the adapter
    will sample it (:func:`pair_sampling`) through ``cache``, so a :class:`FrameCache` handed on to the
    adapter starts full. A video is bad when it is missing, empty, not a video, in a codec FFmpeg cannot
    decode, corrupt or truncated, or has fewer frames than asked for (``short_clips="error"``).

    A bad video raises :class:`~mmalign.pairs.PairFormatError` for the first pair (in dataset order) that
    shows it, naming the pairs file and line, the field, the pair id and the video, and counting the other
    bad pairs. With ``skip_bad=True`` those pairs are left out and listed in the report instead; a
    ``PairDataset`` passed in is filtered in place (``pairs``, ``skipped``). Returns a
    :class:`mmalign.pairs.MediaCheckReport` (``pairs``, ``skipped``, ``files``: distinct clips sampled).
    """
    from tqdm.auto import tqdm

    from mmalign.pairs import MediaCheckReport, PairDataset, PairFormatError, SkippedRow

    pairs = list(dataset.pairs if isinstance(dataset, PairDataset) else dataset)
    if media_root is None and isinstance(dataset, PairDataset):
        media_root = dataset.root
    cache = cache if cache is not None else FrameCache()
    problems: dict[tuple[Any, ...], str | None] = {}  # (paths, sampling) -> error or None
    kept: list[Any] = []
    bad: list[SkippedRow] = []
    for i, pair in enumerate(tqdm(pairs, desc="checking videos", unit="pair", disable=not progress)):
        problem: tuple[str, str] | None = None
        for side in ("chosen", "rejected"):
            try:
                paths = pair_media(pair, side, media_root)
                side_sampling = pair_sampling(pair, side, sampling)
            except ValueError as exc:
                problem = (f"{side}_media", str(exc))
                break
            key = (tuple(str(p) for p in paths), side_sampling)
            if key not in problems:
                try:
                    cache.get(paths if len(paths) > 1 else paths[0], side_sampling)
                    problems[key] = None
                except (ValueError, OSError) as exc:  # MediaError is a ValueError
                    problems[key] = str(exc)
            if problems[key] is not None:
                problem = (f"{side}_media", str(problems[key]))
                break
        if problem is None:
            kept.append(pair)
            continue
        source, line, unit = getattr(pair, "origin", None) or ("<pairs>", i + 1, "item")
        bad.append(SkippedRow(line, problem[0], f"pair {pair.id!r}: {problem[1]}", source, unit))
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad pair(s))" if len(bad) > 1 else ""
        raise PairFormatError(f"{first.reason}{more}: pass skip_bad=True to skip the pairs that show bad videos",
                              source=first.source, line=first.line, field=first.field, unit=first.unit)
    if isinstance(dataset, PairDataset):
        dataset.pairs = kept
        dataset.skipped.extend(bad)
    return MediaCheckReport(pairs=kept, skipped=bad, files=len(problems))
