"""video.frames: seeking decode equals a full decode at a fraction of the work, uniform and fps sampling,
frame lists, the frame cache, a real clip panned over scikit-image photos, and clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mmalign.pairs import MediaError
from video.frames import (
    DecodeStats,
    FrameCache,
    FrameSampling,
    decode_frames,
    fps_indices,
    load_clip,
    probe,
    require_av,
    write_video,
)
from video.synthetic import moving_square_clip, pan_zoom_clip

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("frames") / "square.mp4"
    write_video(path, moving_square_clip(120, size=(32, 48)), fps=24, gop_size=8)
    return path


def test_probe(long_clip) -> None:  # noqa: ANN001
    info = probe(long_clip)
    assert (info.num_frames, info.fps, info.width, info.height) == (120, 24.0, 48, 32)
    assert info.duration == pytest.approx(5.0)


def test_sparse_decode_seeks_and_equals_full_decode(long_clip) -> None:  # noqa: ANN001
    full_stats, sparse_stats = DecodeStats(), DecodeStats()
    full = decode_frames(long_clip, range(120), stats=full_stats)
    wanted = [0, 40, 80, 119]
    sparse = decode_frames(long_clip, wanted, stats=sparse_stats)
    assert full_stats.decoded == 120 and full_stats.seeks == 0
    # keyframes every 8 frames: at most one GOP decoded per wanted frame, far less than the clip
    assert sparse_stats.seeks == 3 and sparse_stats.decoded <= 4 * 8
    assert torch.equal(sparse, full[wanted])
    assert sparse.dtype == torch.uint8 and sparse.shape == (4, 3, 32, 48)
    # order of the request is kept, duplicates allowed
    assert torch.equal(decode_frames(long_clip, [80, 0, 80]), full[[80, 0, 80]])


def test_long_gop_is_decoded_on_not_sought_backwards(tmp_path) -> None:  # noqa: ANN001
    """Keyframes every 120 frames, wanted frames ~34 apart: seeking would land behind the decoder each time;
    after one such seek the decoder learns the spacing and decodes on (about one pass over the clip)."""
    path = write_video(tmp_path / "long_gop.mp4", moving_square_clip(240, size=(32, 48)), fps=24, gop_size=120)
    wanted = FrameSampling(num_frames=8).indices(240, 24.0)
    stats = DecodeStats()
    frames = decode_frames(path, wanted, stats=stats)
    assert stats.seeks <= 2 and stats.decoded <= 240 + 40
    assert torch.equal(frames, decode_frames(path, range(240))[wanted])


def test_sampling_indices() -> None:
    assert FrameSampling(num_frames=4).indices(16, 24.0) == [0, 5, 10, 15]
    assert FrameSampling(num_frames=1).indices(16, 24.0) == [7]
    keep = FrameSampling(num_frames=16, short_clips="keep")
    assert keep.indices(5, 24.0) == [0, 1, 2, 3, 4]  # a short clip gives all it has
    assert FrameSampling(num_frames=16, multiple_of=2, short_clips="keep").indices(5, 24.0) == [0, 1, 2, 3]
    with pytest.raises(MediaError, match="5 frame.*16 asked"):
        FrameSampling(num_frames=16).indices(5, 24.0)
    assert FrameSampling(fps=2).indices(48, 24.0) == [0, 12, 24, 36]
    assert fps_indices(120, 24.0, 2.0, max_frames=4) == [0, 36, 72, 108]
    assert FrameSampling() == FrameSampling(num_frames=16)
    with pytest.raises(ValueError, match="exactly one"):
        FrameSampling(num_frames=8, fps=1.0)
    with pytest.raises(ValueError, match="frame rate"):
        FrameSampling(fps=1.0).indices(10, None)


def test_fps_sampling_reads_the_right_frames(long_clip) -> None:  # noqa: ANN001
    clip = load_clip(long_clip, FrameSampling(fps=1.0))
    assert clip.indices == [0, 24, 48, 72, 96]
    assert clip.metadata() == {"total_num_frames": 120, "fps": 24.0, "duration": 5.0, "frames_indices": clip.indices}
    assert torch.equal(clip.frames, decode_frames(long_clip, range(120))[clip.indices])
    assert [im.size for im in clip.pil()] == [(48, 32)] * 5


def test_frame_list_and_cache(tmp_path, long_clip) -> None:  # noqa: ANN001
    from PIL import Image

    frames = moving_square_clip(6, size=(16, 16))
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(f).save(paths[-1])
    clip = load_clip(paths, FrameSampling(num_frames=3))
    assert clip.indices == [0, 3, 5] and clip.fps is None  # round(linspace(0, 5, 3)), halves up
    assert torch.equal(clip.frames, torch.from_numpy(frames[[0, 3, 5]]).permute(0, 3, 1, 2))
    cache = FrameCache()
    for _ in range(3):  # three passes over two clips
        cache.get(long_clip, FrameSampling(num_frames=4))
        cache.get(paths, FrameSampling(num_frames=3))
    assert (cache.misses, cache.hits, cache.stats.videos) == (2, 4, 1)
    small = FrameCache(max_bytes=1)  # keeps only the newest clip
    small.get(long_clip, FrameSampling(num_frames=4))
    small.get(long_clip, FrameSampling(num_frames=2))
    assert len(small) == 1


def test_real_clip_from_photos(tmp_path) -> None:
    """A pan-and-zoom over scikit-image's astronaut, coffee and chelsea photos (24 frames each), encoded with
    libx264 when PyAV has it: decoding is close to the source and follows the camera move."""
    data = pytest.importorskip("skimage.data")
    source = np.concatenate([pan_zoom_clip(img, 24, size=(96, 128)) for img in (data.astronaut(), data.coffee(), data.chelsea())])
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = write_video(tmp_path / "photos.mp4", source, fps=24, codec=codec, bit_rate=2_000_000)
    clip = load_clip(path, FrameSampling(num_frames=8))
    assert clip.total_frames == 72 and clip.frames.shape == (8, 3, 96, 128)
    decoded = clip.frames.permute(0, 2, 3, 1).numpy().astype(float)
    mse = ((decoded - source[clip.indices].astype(float)) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 25  # PSNR in dB
    # consecutive samples differ (the camera moves; the photo changes every 24 frames)
    assert all(np.abs(decoded[i + 1] - decoded[i]).mean() > 2 for i in range(7))
    # a seek for every frame (B-frames with libx264) still lands on the frames a full decode gives
    full = decode_frames(path, range(72))
    wanted = sorted(np.random.default_rng(0).choice(72, size=10, replace=False).tolist())
    stats = DecodeStats()
    assert torch.equal(decode_frames(path, wanted, seek_gap=0, stats=stats), full[wanted])
    assert stats.seeks >= 5
    # max_side shrinks at decode time (area interpolation): 96x128 -> 48x64, close to the shrunk source
    small = load_clip(path, FrameSampling(num_frames=2, max_side=64))
    assert small.frames.shape == (2, 3, 48, 64)
    reference = torch.nn.functional.avg_pool2d(full[small.indices].float(), 2)
    assert (small.frames.float() - reference).abs().mean() < 3


def test_errors(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="bad.mp4"):
        probe(bad)
    with pytest.raises(MediaError, match="does not exist"):
        decode_frames(tmp_path / "missing.mp4", [0])
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"mmalign\[video\]"):
        require_av()
