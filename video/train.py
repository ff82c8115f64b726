"""Glue: load a video LLM and its processor, build the adapter and dataset, call the engine.

``run(VideoTrainConfig(...))`` is what ``scripts/train_video.py`` calls. Models load like the image VLMs
(:func:`vision.train.load_vlm`: ``AutoModelForImageTextToText`` / ``AutoProcessor``, safetensors only,
remote code off unless asked; ``tiny:<name>`` is a tiny model of :mod:`mmalign.tiny`, see :mod:`mmalign.hub`).

PhysDPO's recipe (PhysGame/PhysVLM, arXiv 2412.01800): DPO on LLaVA-OneVision-Qwen2-7B with 16 frames,
beta 0.1, learning rate 5e-6, 2 epochs, full fine-tuning, no SFT term; ``scripts/configs/*physdpo*.yaml``
carry it for LLaVA-OneVision, LLaVA-NeXT-Video and Qwen2.5-VL.

The trained model is saved as users load it, like the image VLMs': ``output_dir/adapter`` (LoRA: a PEFT
folder that ``PeftModel.from_pretrained(base, path)`` loads) or ``output_dir/model`` (full fine-tuning: a
``save_pretrained`` folder), each with the processor and a model card; ``push_to_hub`` uploads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmalign.config import help_
from mmalign.engine import TrainConfig

__all__ = ["VideoTrainConfig", "run"]


@dataclass
class VideoTrainConfig:
    """Preference optimisation of a video LLM (every field a CLI flag and a YAML key)."""

    model: str = field(default="", metadata=help_("model folder, hub name or tiny:<name> (AutoModelForImageTextToText)"))
    data: str = field(default="", metadata=help_("pair dataset folder, or LLaVA-Hound records with data_format=llava_hound"))
    data_format: str = field(default="pairs", metadata=help_("pairs (our folder) | llava_hound (JSON/JSONL records)"))
    video_root: str | None = field(default=None, metadata=help_("folder of the videos LLaVA-Hound records name"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own Python code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    num_frames: int | None = field(default=16, metadata=help_("frames per video, uniformly spaced (PhysDPO: 16)"))
    sample_fps: float | None = field(default=None, metadata=help_("instead of num_frames: frames per second of video"))
    max_frames: int | None = field(default=None, metadata=help_("with sample_fps: at most this many frames"))
    frame_multiple: int = field(default=1, metadata=help_("drop trailing frames to a multiple (2 for Qwen2-VL)"))
    frame_max_side: int | None = field(
        default=None, metadata=help_("shrink decoded frames to this longer side (frame-cache memory; None: as decoded)")
    )
    max_length: int | None = field(default=4096, metadata=help_("max tokens per row (video tokens are never cut)"))
    truncation: str = field(default="response", metadata=help_("response (cut the response) | drop (drop the pair)"))
    system_prompt: str | None = field(default=None, metadata=help_("system message for every prompt"))
    lora_scope: str = field(default="language", metadata=help_("LoRA targets: language | language+projector | all"))
    short_clips: str = field(default="error", metadata=help_("a clip with fewer frames than num_frames: error | keep (all it has)"))
    check_videos: bool = field(default=True, metadata=help_("sample every video once before the model loads"))
    skip_bad: bool = field(
        default=False,
        metadata=help_("skip and count pairs with bad records or videos (missing, empty, corrupt, unsupported codec, "
                       "too short) instead of stopping at the first; implies check_videos"),
    )
    push_to_hub: str | None = field(default=None, metadata=help_("upload the trained adapter/model folder (with its "
                                                                  "card) to this Hub repo id, private, at the end"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=help_("engine settings"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("VideoTrainConfig.model is required (a model folder, name or tiny:<name>)")
        if not self.data:
            raise ValueError("VideoTrainConfig.data is required (a pair dataset folder or records file)")
        if self.data_format not in ("pairs", "llava_hound"):
            raise ValueError(f"VideoTrainConfig.data_format must be 'pairs' or 'llava_hound', got {self.data_format!r}")
        if self.data_format == "llava_hound" and not self.video_root:
            raise ValueError("VideoTrainConfig: data_format=llava_hound needs video_root")
        if self.truncation not in ("response", "drop"):
            raise ValueError(f"VideoTrainConfig.truncation must be 'response' or 'drop', got {self.truncation!r}")
        if self.sample_fps is not None:
            self.num_frames = None
        if self.skip_bad:
            self.check_videos = True
        self.sampling()  # validates the frame settings

    def sampling(self) -> Any:
        """The :class:`~video.frames.FrameSampling` these settings describe."""
        from video.frames import FrameSampling

        return FrameSampling(num_frames=self.num_frames, fps=self.sample_fps, max_frames=self.max_frames,
                             multiple_of=self.frame_multiple, max_side=self.frame_max_side,
                             short_clips=self.short_clips)


def run(config: VideoTrainConfig) -> Any:
    """Train ``config.model`` on ``config.data`` with the engine; returns its ``TrainResult``."""
    from mmalign.distributed import process_state
    from mmalign.engine import train
    from mmalign.pairs import PairDataset
    from video.adapter import VideoLLMAdapter
    from video.formats import load_video_pairs
    from video.frames import FrameCache, check_videos
    from vision.train import load_vlm, save_result

    dataset = load_video_pairs(config.data, data_format=config.data_format, video_root=config.video_root,
                               skip_bad=config.skip_bad)
    cache = FrameCache()
    if config.check_videos:  # every clip decodes (into the adapter's frame cache) before the model loads
        report = check_videos(dataset, config.sampling(), cache=cache, skip_bad=config.skip_bad,
                              progress=config.train.progress and process_state().is_main_process)
        if dataset.skipped and process_state().is_main_process:
            print(f"video.train: skipped {len(dataset.skipped)} bad pair(s) ({report.bad} with bad videos); "
                  f"first: {dataset.skipped[0]}")
        if not dataset.pairs:
            raise ValueError(f"no pair of {config.data} has readable videos ({len(dataset.skipped)} skipped)")
    model, processor = load_vlm(config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype)
    adapter = VideoLLMAdapter(
        processor, media_root=dataset.root, sampling=config.sampling(), max_length=config.max_length,
        truncation=config.truncation, system_prompt=config.system_prompt, lora_scope=config.lora_scope, cache=cache,
    )
    adapter.check_model(model)
    kept, dropped = adapter.filter_pairs(dataset.pairs)
    if dropped:
        print(f"video.train: dropped {sum(dropped.values())} of {len(dataset)} pairs: {dict(dropped)}")
    if not kept:
        raise ValueError(f"no pair of {config.data} fits max_length={config.max_length}")
    result = train(model, adapter, PairDataset(kept, root=dataset.root), config.train)
    if process_state().is_main_process:  # output_dir/adapter (LoRA) or output_dir/model, with a model card
        folder = save_result(result, processor, config, dataset=str(config.data), kind="video-text-to-text")
        if config.push_to_hub:
            from mmalign.export import push_to_hub

            print(f"pushed {folder} to {config.push_to_hub}: {push_to_hub(folder, config.push_to_hub)}")
    return result
