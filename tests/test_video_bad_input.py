"""Bad videos: a corrupt or truncated file, a zero-length file, a clip shorter than the frames asked for, an
unsupported codec, a file that is not a video, a missing file, and a variable-frame-rate clip. Each gives an
error naming the file (and the pair or record and field where there is one) or, with ``skip_bad``, is
skipped and counted, in training data loading and in PhysDPO generation; a PhysDPO run that meets one keeps
everything it generated and a re-run does not redo it. A variable-frame-rate clip is not bad: it decodes,
each frame the one shown at the time its index says."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.pairs import MediaError, PairDataset, PairFormatError, PreferencePair, read_pairs, write_pairs
from video.frames import (
    DecodeStats,
    FrameCache,
    FrameSampling,
    check_videos,
    decode_frames,
    load_clip,
    probe,
    write_video,
)
from video.synthetic import moving_square_clip

av = pytest.importorskip("av")


def _bad_videos(folder: Path) -> dict[str, Path]:
    """One file per kind of bad input (and a good clip), each named after its kind."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = moving_square_clip(40, size=(32, 48))
    good = write_video(folder / "good.mp4", frames, fps=24)
    mkv = write_video(folder / "source.mkv", frames, fps=24).read_bytes()
    out = {"good": good}
    # garbage over the middle of an MKV: the demuxer stops early, one frame of forty decodes
    corrupt = bytearray(mkv)
    n = len(corrupt)
    corrupt[n // 3 : n // 3 + 1500] = np.random.default_rng(0).integers(0, 255, 1500, dtype=np.uint8).tobytes()
    (folder / "corrupt.mkv").write_bytes(bytes(corrupt))
    out["corrupt"] = folder / "corrupt.mkv"
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the index (moov) is lost
    out["truncated"] = folder / "truncated.mp4"
    (folder / "empty.mp4").write_bytes(b"")
    out["empty"] = folder / "empty.mp4"
    out["short"] = write_video(folder / "short.mp4", frames[:3], fps=24)
    (folder / "codec.mkv").write_bytes(mkv.replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ASP"))  # a codec id FFmpeg lacks
    out["codec"] = folder / "codec.mkv"
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    out["text"] = folder / "text.mp4"
    with av.open(str(folder / "audio.mp4"), "w") as container:  # a real container holding only sound
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 2048), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    out["audio"] = folder / "audio.mp4"
    out["missing"] = folder / "missing.mp4"
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _bad_videos(tmp_path_factory.mktemp("bad"))


EXPECTED = {
    "corrupt": "truncated or damaged",
    "truncated": "no video stream",
    "empty": "empty \\(0 bytes\\)",
    "short": "3 frame\\(s\\), fewer than the 8 asked for",
    "codec": "codec .* not supported",
    "text": "not a video",
    "audio": "no video stream",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_bad_video_gives_an_error_naming_the_file(videos: dict[str, Path], kind: str) -> None:
    with pytest.raises(MediaError, match=EXPECTED[kind]) as info:
        load_clip(videos[kind], FrameSampling(num_frames=8))
    assert videos[kind].name in str(info.value)


def test_short_clip_keeps_its_frames_when_asked(videos: dict[str, Path]) -> None:
    clip = load_clip(videos["short"], FrameSampling(num_frames=8, short_clips="keep"))
    assert clip.indices == [0, 1, 2] and clip.total_frames == 3


def test_variable_frame_rate_clip_samples_by_time(tmp_path: Path) -> None:
    """Twenty frames 10 ms apart, then twenty 90 ms apart; frame k is grey level 5 + 6k. Index i means the
    frame shown at i / fps (fps = the stream's average): each sampled frame is within one frame duration of
    that time, and a seeking decode gives the frames a full decode gives."""
    steps = [10] * 20 + [90] * 20
    pts = np.concatenate([[0], np.cumsum(steps)[:-1]])  # milliseconds
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size, stream.bit_rate = 8, 4_000_000  # grey levels decode within +-1
        for k, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 5 + 6 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe(path)
    assert info.num_frames == 40
    clip = load_clip(path, FrameSampling(num_frames=6))
    shown = [round((float(f.float().mean()) - 5) / 6) for f in clip.frames]
    for index, k in zip(clip.indices, shown, strict=True):
        assert abs(pts[k] / 1000 - index / clip.metadata()["fps"]) <= 0.09 + 1e-6
    assert shown == sorted(shown) and shown[-1] == 39 and shown[0] == 0
    stats = DecodeStats()
    sparse = decode_frames(path, clip.indices, seek_gap=0, stats=stats)
    assert stats.seeks >= 1 and torch.equal(sparse, decode_frames(path, range(40))[clip.indices])


def test_long_last_frame_is_not_taken_for_truncation(tmp_path: Path) -> None:
    """Twenty frames 40 ms apart, the last one lasting 2 s (a still at the end, as screen recorders write it):
    the late indices fall inside the last frame, which lasts to the declared duration: not a damaged file."""
    path = tmp_path / "still_end.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        packets = []
        for k in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 10 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 40 * k, Fraction(1, 1000)
            packets += stream.encode(frame)
        packets += stream.encode()
        for packet in packets:
            packet.duration = 40
        packets[-1].duration = 2000
        for packet in packets:
            container.mux(packet)
    clip = load_clip(path, FrameSampling(num_frames=8))
    assert clip.indices[-1] == 19
    last = decode_frames(path, range(20))[-1]
    assert all(torch.equal(clip.frames[i], last) for i in range(3, 8))  # indices 8..19 are shown at >= 1.1 s


# ---------------------------------------------------------------- training data


def _pair_folder(root: Path, videos: dict[str, Path], kinds: list[str]) -> Path:
    media = root / "media"
    media.mkdir(parents=True)
    pairs = []
    for i, kind in enumerate(kinds):
        name = f"{i}_{videos[kind].name}"
        if videos[kind].exists():
            (media / name).write_bytes(videos[kind].read_bytes())
        pairs.append(PreferencePair(f"p{i}-{kind}", "what moves", "a square", "a cat", [f"media/{name}"],
                                    [f"media/{name}"]))
    write_pairs(root, pairs, check_media=False)
    return root


def test_check_videos_names_pair_field_and_file_or_skips_and_counts(tmp_path: Path, videos: dict[str, Path]) -> None:
    kinds = ["good", "corrupt", "empty", "short", "codec", "text", "good"]
    data = _pair_folder(tmp_path / "data", videos, kinds)
    sampling = FrameSampling(num_frames=8)
    with pytest.raises(PairFormatError) as info:
        check_videos(PairDataset(data), sampling, progress=False)
    message = str(info.value)
    for part in ("pairs.jsonl", "line 2", "chosen_media", "p1-corrupt", "1_corrupt.mkv", "4 more bad pair"):
        assert part in message, message
    dataset = PairDataset(data)
    cache = FrameCache()
    report = check_videos(dataset, sampling, cache=cache, skip_bad=True, progress=False)
    assert [p.id for p in dataset] == ["p0-good", "p6-good"] and report.bad == 5 and report.files == 7
    assert sorted(row.line for row in dataset.skipped) == [2, 3, 4, 5, 6]
    assert all(row.field == "chosen_media" for row in dataset.skipped)
    assert len(cache) == 2  # the good clips are in the cache the adapter will use


def test_training_skips_bad_pairs_or_stops_before_the_model_loads(tmp_path: Path, videos: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import vision.train
    from mmalign.engine import TrainConfig
    from video.train import VideoTrainConfig, run

    data = _pair_folder(tmp_path / "data", videos, ["good", "missing", "truncated", "good", "good"])
    common = dict(model="tiny:llava_next_video", data=str(data), num_frames=2)
    train = dict(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, trackers=[], progress=False, plot=False)
    with pytest.raises(PairFormatError, match=r"line 2.*chosen_media.*not found"):  # a missing file: at load
        run(VideoTrainConfig(**common, train=TrainConfig(**train)))

    def no_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model loaded before the videos were checked")

    (data / "media" / "1_missing.mp4").write_bytes(videos["good"].read_bytes())  # now only the truncated one
    with monkeypatch.context() as patch:
        patch.setattr(vision.train, "load_vlm", no_model)
        with pytest.raises(PairFormatError, match=r"line 3.*p2-truncated.*2_truncated.mp4.*no video stream"):
            run(VideoTrainConfig(**common, train=TrainConfig(**train)))
    (data / "media" / "1_missing.mp4").unlink()
    result = run(VideoTrainConfig(**common, skip_bad=True, train=TrainConfig(**train)))
    assert result.global_step == 1


# ---------------------------------------------------------------- PhysDPO generation


def _records(root: Path, videos: dict[str, Path], kinds: list[str]) -> Path:
    rows = []
    for i, kind in enumerate(kinds):
        name = f"videos/{i}_{kind}.mp4"
        (root / "videos").mkdir(parents=True, exist_ok=True)
        if videos[kind].exists():
            (root / name).write_bytes(videos[kind].read_bytes())
        rows.append({"id": f"r{i}", "video": name, "question": "what moves", "answer": f"answer {i}",
                     "title": f"title {i}"})
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "qa.jsonl"


class _Fake:
    """A generator that records what it was asked for and answers without a model."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, model, processor, prompts, clips, seeds, settings, **kw):  # noqa: ANN001, ANN003, ANN204
        self.prompts.extend(prompts)
        return [f"hacked {s}" for s in seeds]


def test_physdpo_bad_video_keeps_what_was_generated_and_resumes(tmp_path: Path, videos: dict[str, Path]) -> None:
    from video.physdpo import PhysDPOConfig, build_physdpo_pairs

    qa = _records(tmp_path, videos, ["good", "corrupt", "good"])
    config = PhysDPOConfig(records=str(qa), out_dir=str(tmp_path / "out"), num_frames=4, batch_size=2, progress=False)
    fake = _Fake()
    with pytest.raises(MediaError) as info:
        build_physdpo_pairs(None, None, config, rank=0, world_size=1, generate_fn=fake)
    message = str(info.value)
    for part in ("qa.jsonl", "record 2", "'r1'", "field 'video'", "1_corrupt.mp4", "truncated or damaged",
                 "3 pairs written"):
        assert part in message, message
    # the batch before and the rest of the failing batch (r0's three hacks) are written
    written = [json.loads(line)["id"] for line in (tmp_path / "out/shards/rank00000/pairs.jsonl").read_text().splitlines()]
    assert written == ["physdpo/r0/title", "physdpo/r0/frames", "physdpo/r0/resolution"]

    (tmp_path / "videos" / "1_corrupt.mp4").write_bytes(videos["good"].read_bytes())  # fixed: a re-run continues
    again = _Fake()
    report = build_physdpo_pairs(None, None, config, rank=0, world_size=1, generate_fn=again)
    assert report.already_done == 3 and report.written == 6 and report.merged == 9 and len(again.prompts) == 6
    assert len({p.id for p in read_pairs(tmp_path / "out")}) == 9


def test_physdpo_skip_bad_skips_and_counts_each_kind(tmp_path: Path, videos: dict[str, Path]) -> None:
    from video.physdpo import PhysDPOConfig, build_physdpo_pairs

    kinds = ["good", "corrupt", "empty", "short", "codec", "text", "missing", "good"]
    qa = _records(tmp_path, videos, kinds)
    config = PhysDPOConfig(records=str(qa), out_dir=str(tmp_path / "out"), num_frames=8, batch_size=4,
                           progress=False, skip_bad=True)
    report = build_physdpo_pairs(None, None, config, rank=0, world_size=1, generate_fn=_Fake())
    assert report.written == 6 and report.merged == 6
    bad = report.skipped["bad video"]
    assert len(bad) == 6 * 3  # every hack of each bad record, its video decoded once
    for i, kind in enumerate(kinds[1:-1], start=1):
        mine = [b for b in bad if f"physdpo/r{i}/" in b]
        assert len(mine) == 3 and f"record {i + 1} (id 'r{i}'), field 'video'" in mine[0] and f"{i}_{kind}" in mine[0]
    assert {p.meta["physdpo"]["record_id"] for p in read_pairs(tmp_path / "out")} == {"r0", "r7"}
