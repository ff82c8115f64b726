"""diffusion.families: detection of each tiny family, each strategy's encoding, forward and latent shapes,
a family registered from outside picked up by the adapter and the cache, and the unknown-pipeline error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion.adapter import DiffusionAdapter, detect_architecture
from diffusion.cache import LatentCache, build_cache
from diffusion.families import (
    FAMILIES,
    VARIANCE_PRESERVING,
    canonical_name,
    denoiser,
    family_of,
    get_family,
    register_family,
    unregister_family,
    vae_scale_factor,
)
from diffusion.reno import NoiseSampler
from mmalign.pairs import PreferencePair

CPU = torch.device("cpu")
SEQ = 8  # T5 tokens for the SD3 and Flux encodings: keeps them small


@pytest.fixture(scope="module")
def pipes(tiny_sd: Any, tiny_sdxl: Any, tiny_sd3: Any, tiny_flux: Any, tiny_flux_dev: Any) -> dict[str, Any]:
    """The session's shared tiny pipelines by family key (read-only)."""
    return {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux, "flux_dev": tiny_flux_dev}


def _pixart(vae: Any) -> Any:
    """A tiny PixArt-alpha pipeline built from configs (learned-sigma output halves, DDIM) around ``vae``
    (frozen, only read); its T5 text encoding is stubbed (a T5 tokenizer would need sentencepiece files):
    5 tokens of width 32 and a mask."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=32, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae,
                               transformer=transformer, scheduler=scheduler)

    def stub(**kw: Any) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        texts = kw["prompt"]
        embeds = torch.stack([torch.full((5, 32), float(len(t))) for t in texts]) / 10
        mask = torch.ones(len(texts), 5, dtype=torch.long)
        mask[:, 3:] = 0
        return embeds, mask, None, None

    pipe.encode_prompt = stub
    return pipe


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, write_image_pairs: Any) -> list[PreferencePair]:
    return write_image_pairs(tmp_path_factory.mktemp("family_pairs"), 2, prompt=["a red cube", "a dog"])


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("key", "name", "attr"), [
    ("sd", "sd", "unet"), ("sdxl", "sdxl", "unet"), ("sd3", "sd3", "transformer"),
    ("flux", "flux", "transformer"), ("flux_dev", "flux", "transformer"),
])
def test_each_tiny_family_is_detected(pipes: dict[str, Any], key: str, name: str, attr: str) -> None:
    pipe = pipes[key]
    family = family_of(pipe)
    assert family.name == name and detect_architecture(pipe) == name
    assert get_family(name) is family
    assert denoiser(pipe) is getattr(pipe, attr) and family.denoiser_attr == attr
    # exactly one registered family claims each pipeline
    assert [f.name for f in FAMILIES.values() if f.detect(pipe)] == [name]


def test_pixart_detected_by_its_transformer_config(tiny_sd: Any) -> None:
    assert family_of(_pixart(tiny_sd.vae)).name == "pixart"


def test_one_name_for_sd3_with_flow_as_alias(tmp_path: Path) -> None:
    assert canonical_name("flow") == "sd3" and get_family("flow") is get_family("sd3")
    with pytest.raises(ValueError, match=r"unknown diffusion family 'sd4'.*sd3 \(alias flow\)"):
        get_family("sd4")
    # a cache index written when SD3 was called "flow" reads as "sd3"
    (tmp_path / "index.json").write_text(json.dumps({"meta": {"version": 2, "architecture": "flow"}, "shards": []}))
    assert LatentCache(tmp_path).meta["architecture"] == "sd3"


def test_unknown_pipeline_is_a_clear_error(pipes: dict[str, Any]) -> None:
    class MysteryPipeline:
        def __init__(self) -> None:
            self.transformer = torch.nn.Linear(2, 2)
            self.vae = pipes["sd"].vae
            self.scheduler = pipes["sd"].scheduler

    pattern = r"MysteryPipeline \(transformer=Linear, vae=AutoencoderKL\) is not a diffusion family.*sdxl.*register_family"
    with pytest.raises(ValueError, match=pattern):
        family_of(MysteryPipeline())
    with pytest.raises(ValueError, match="MysteryPipeline"):
        DiffusionAdapter(MysteryPipeline())
    with pytest.raises(ValueError, match="MysteryPipeline"):
        NoiseSampler(MysteryPipeline(), ["a cat"])


# ---------------------------------------------------------------------------------------------- strategies


def _timesteps(family: Any, pipe: Any, n: int) -> dict[str, torch.Tensor]:
    scheduler, _ = family.noise.training_scheduler(pipe)
    return family.noise.draw(scheduler, n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("key", "pooled", "time_ids"), [
    ("sd", False, False), ("sdxl", True, True), ("sd3", True, False), ("flux", True, False), ("flux_dev", True, False),
])
def test_encode_forward_and_latent_shapes(pipes: dict[str, Any], key: str, pooled: bool, time_ids: bool) -> None:
    pipe = pipes[key]
    family = family_of(pipe)
    t5 = family.default_max_sequence_length(pipe) is not None
    assert t5 == (family.name in ("sd3", "flux"))  # CLIP-only families take no T5 length
    with torch.no_grad():
        cond, negative = family.encode_prompt(pipe, ["a cat", "a red dog"], device=CPU,
                                              max_sequence_length=SEQ if t5 else None)
    assert negative is None
    assert cond["prompt_embeds"].dim() == 3 and cond["prompt_embeds"].shape[0] == 2
    assert ("pooled_embeds" in cond) == pooled and (not pooled or cond["pooled_embeds"].shape[0] == 2)
    if t5:  # the T5 length is the family's to pass on: 4 tokens fewer, 4 positions fewer
        with torch.no_grad():
            shorter = family.encode_prompt(pipe, ["a cat"], device=CPU, max_sequence_length=SEQ - 4)[0]
        assert cond["prompt_embeds"].shape[1] - shorter["prompt_embeds"].shape[1] == 4

    image = family.image_conditions(pipe, (40, 50), (3, 4), (32, 32))
    assert ("time_ids" in image) == time_ids
    if time_ids:
        assert image["time_ids"].tolist() == [40, 50, 3, 4, 32, 32]
    cond.update({k: v.expand(2, *v.shape) for k, v in image.items()})

    resolution = family.default_resolution(pipe)
    assert resolution % family.resolution_multiple(pipe) == 0
    side = resolution // vae_scale_factor(pipe)
    noise = torch.randn(2, family.latent_channels(pipe), side, side, generator=torch.Generator().manual_seed(1))
    drawn = _timesteps(family, pipe, 2)
    assert ("sigmas" in drawn) == family.noise.flow_matching
    guidance = 3.5 if family.guidance_embedded(pipe) else None
    model = denoiser(pipe)
    with torch.no_grad():
        out = family.forward(model, noise, drawn["timesteps"], cond, guidance=guidance)
        assert out.shape == noise.shape  # Flux: packed for the transformer, unpacked again
        packed = family.to_pipeline_latents(noise)
        assert torch.equal(family.from_pipeline_latents(packed, side, side), noise)
        if family.name == "flux":
            assert packed.shape == (2, (side // 2) ** 2, 4 * noise.shape[1])
        if time_ids:  # the added conditions reach the UNet
            other = dict(cond, time_ids=cond["time_ids"] * 2)
            assert not torch.allclose(family.forward(model, noise, drawn["timesteps"], other), out)
        if guidance is not None:  # the guidance embedding reaches the transformer
            assert not torch.allclose(family.forward(model, noise, drawn["timesteps"], cond, guidance=1.0), out)


def test_sdxl_empty_prompt_is_zeros_when_the_pipeline_says_so(pipes: dict[str, Any]) -> None:
    pipe = pipes["sdxl"]
    family = family_of(pipe)
    with torch.no_grad():
        empty = family.empty_conditioning(pipe, CPU)
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    assert set(empty) == {"prompt_embeds", "pooled_embeds"}
    assert all(bool((v == 0).all()) == zeros for v in empty.values())


def test_pixart_encode_forward_and_adapter(tiny_sd: Any, pairs: list[PreferencePair]) -> None:
    """Attention mask and learned-sigma halves: the family keeps the noise half; the adapter trains on it."""
    pipe = _pixart(tiny_sd.vae)
    family = family_of(pipe)
    cond, _ = family.encode_prompt(pipe, ["a", "abc"], device=CPU)
    assert set(cond) == {"prompt_embeds", "attention_mask"} and cond["attention_mask"].shape == (2, 5)
    noise = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = family.forward(pipe.transformer, noise, torch.tensor([10, 900]), cond)
    assert out.shape == noise.shape  # 8 output channels: the first 4 kept

    adapter = DiffusionAdapter(pipe, media_root=pairs[0].root, empty_prompt_prob=0.5)
    assert adapter.architecture == "pixart" and adapter.prediction_type == "epsilon"
    batch = adapter.prepare(adapter.collate(pairs), generator=torch.Generator().manual_seed(0))
    result = adapter.logps(pipe.transformer, batch)
    assert result.chosen.shape == result.rejected.shape == (2,)
    assert torch.isfinite(result.chosen).all() and torch.isfinite(result.rejected).all()


# ---------------------------------------------------------------------------------------------- a new family


class _TextBiasNet(torch.nn.Module):
    """The new family's denoiser: a convolution of the noisy latent plus a per-sample text bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + bias.view(-1, 1, 1, 1)


class _TextBiasPipeline:
    """A pipeline no built-in family knows: the tiny SD VAE and scheduler around a ``net``."""

    def __init__(self, sd: Any) -> None:
        torch.manual_seed(0)
        self.vae, self.scheduler = sd.vae, sd.scheduler
        self.net = _TextBiasNet(int(sd.vae.config.latent_channels))


class TextBiasFamily:
    """A family written outside the package: the prompt's length is its conditioning."""

    name = "text_bias"
    aliases = ("textbias",)
    denoiser_attr = "net"
    text_encoder_attrs: tuple[str, ...] = ()
    noise = VARIANCE_PRESERVING
    latent_shift = False
    classifier_free_guidance = True

    def detect(self, pipeline: Any) -> bool:
        return isinstance(getattr(pipeline, "net", None), _TextBiasNet)

    def default_resolution(self, pipeline: Any) -> int:
        return 32

    def resolution_multiple(self, pipeline: Any) -> int:
        return vae_scale_factor(pipeline)

    def latent_channels(self, pipeline: Any) -> int:
        return int(pipeline.vae.config.latent_channels)

    def default_max_sequence_length(self, pipeline: Any) -> None:
        return None

    def guidance_embedded(self, pipeline: Any) -> bool:
        return False

    def encode_prompt(self, pipeline: Any, prompts: list[str], *, device: torch.device, **_: Any) -> tuple[dict, None]:
        return {"prompt_embeds": torch.tensor([[[len(p) / 10]] for p in prompts], device=device)}, None

    def empty_conditioning(self, pipeline: Any, device: torch.device, **_: Any) -> dict[str, torch.Tensor]:
        return self.encode_prompt(pipeline, [""], device=device)[0]

    def image_conditions(self, pipeline: Any, *_: Any) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor], *, guidance: float | None = None) -> torch.Tensor:
        return model(noisy, cond["prompt_embeds"].view(-1).to(noisy.dtype))


@pytest.fixture
def text_bias() -> Any:
    family = register_family(TextBiasFamily())
    try:
        yield family
    finally:
        unregister_family("text_bias")


def test_a_registered_family_is_picked_up_by_the_adapter_and_the_cache(
        text_bias: Any, pipes: dict[str, Any], pairs: list[PreferencePair], tmp_path: Path) -> None:
    pipe = _TextBiasPipeline(pipes["sd"])
    assert family_of(pipe) is text_bias and get_family("textbias") is text_bias
    assert denoiser(pipe) is pipe.net
    with pytest.raises(ValueError, match="already registered"):
        register_family(TextBiasFamily())

    adapter = DiffusionAdapter(pipe, media_root=pairs[0].root)
    assert adapter.architecture == "text_bias" and adapter.latent_shape(2) == (2, 4, 16, 16)
    batch = adapter.prepare(adapter.collate(pairs), generator=torch.Generator().manual_seed(0))
    result = adapter.logps(pipe.net, batch)
    assert result.chosen.shape == (2,) and torch.isfinite(result.chosen).all()
    (result.chosen - result.rejected).sum().backward()
    assert pipe.net.conv.weight.grad is not None and pipe.net.conv.weight.grad.abs().sum() > 0

    build_cache(adapter, pairs, tmp_path / "cache")
    cached = DiffusionAdapter(pipe, cache_dir=tmp_path / "cache")
    again = cached.prepare(cached.collate(pairs), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_cache = cached.logps(pipe.net, again)
    torch.testing.assert_close(from_cache.chosen, result.chosen.detach(), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["meta"]["architecture"] == "text_bias"


def test_unregistered_family_is_gone(pipes: dict[str, Any]) -> None:
    assert "text_bias" not in FAMILIES
    with pytest.raises(ValueError, match="_TextBiasPipeline"):
        family_of(_TextBiasPipeline(pipes["sd"]))
