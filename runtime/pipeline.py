"""Text-to-image on an exported folder: tokenize, encode, sample, decode — numpy + onnxruntime.

The UNet is wrapped into the `denoise(x, sigma) -> x0` callable that edgesd.schedulers
samplers take (k-diffusion's discrete-schedule denoiser: c_in scaling, fractional timestep
from log-sigma interpolation, epsilon or v parameterisation), with classifier-free guidance
done as one batched UNet call.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesd import schedulers
from edgesd.errors import InvalidArgumentError, unknown_name
from edgesd.runtime import providers as provider_names
from edgesd.runtime.images import to_pil, to_unit_nhwc
from edgesd.runtime.infotext import create_infotext
from edgesd.runtime.model_folder import ModelFolder
from edgesd.runtime.rng import make_generator
from edgesd.runtime.tokenizer import ClipTokenizer

OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SIDE = 8192
MAX_STEPS = 1000
MAX_SEED = 2**64 - 1


@dataclass
class GenerationResult:
    images: list | np.ndarray  # PIL images, or float32 NHWC in [0, 1] for output_type="np"
    infotexts: list
    seeds: list
    timings: dict = field(default_factory=dict)

    @property
    def infotext(self) -> str:
        return self.infotexts[0] if self.infotexts else ""


class Pipeline:
    """A loaded model folder. Thread-safe for concurrent calls: all per-call state is local."""

    def __init__(self, folder: ModelFolder, providers: list):
        self.folder = folder
        self.providers = providers
        self.tokenizer = ClipTokenizer(folder.path / "tokenizer")
        self.text_encoder = folder.session("text_encoder", providers)
        self.unet = folder.session("unet", providers)
        self.vae_decoder = folder.session("vae_decoder", providers)
        scheduler = folder.configs["scheduler"]
        self.sigma_table = schedulers.sigma_table(
            scheduler.get("beta_schedule", "scaled_linear"), scheduler.get("beta_start", 0.00085),
            scheduler.get("beta_end", 0.012), scheduler.get("num_train_timesteps", 1000))
        self.scaling_factor = float(folder.configs["vae"].get("scaling_factor", 0.18215))
        self.latent_channels = int(folder.configs["unet"].get("out_channels", 4))
        self.vae_scale = 2 ** (len(folder.configs["vae"]["block_out_channels"]) - 1)
        self.model_name = folder.path.name
        source = (folder.manifest or {}).get("source", {})
        self.model_hash = source.get("sha256", "")[:10] or None

    @classmethod
    def from_pretrained(cls, path: str | Path, provider: str = "auto") -> "Pipeline":
        return cls(ModelFolder.open(path), provider_names.resolve(provider))

    # -- text -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list) -> np.ndarray:
        """(len(prompts), 77, hidden) text-encoder hidden states, one batched call."""
        ids = np.array([self.tokenizer.pad(t) for t in self.tokenizer.encode_batch(prompts)], dtype=np.int64)
        return self.text_encoder.run(["last_hidden_state"], input_ids=ids)[0]

    # -- sampling ---------------------------------------------------------------------

    def make_denoiser(self, cond: np.ndarray, uncond: np.ndarray | None, guidance_scale: float, timings: dict):
        """The `denoise(x, sigma) -> x0` callable over the UNet, with CFG when `uncond` is given."""
        table, prediction = self.sigma_table, self.folder.prediction_type
        dtype = self.unet.input_dtypes["sample"]
        context = cond if uncond is None else np.concatenate([cond, uncond])
        context = context.astype(self.unet.input_dtypes["encoder_hidden_states"])
        t_rank, t_dtype = self.unet.input_ranks["timestep"], self.unet.input_dtypes["timestep"]

        def denoise(x, sigma):
            c_skip, c_out, c_in = schedulers.scalings(float(sigma), prediction)
            t = float(schedulers.sigma_to_t(float(sigma), table))
            if np.issubdtype(t_dtype, np.integer):
                t = round(t)
            model_in = (x * c_in).astype(dtype)
            if uncond is not None:
                model_in = np.concatenate([model_in, model_in])
            timestep = np.full((len(model_in),) if t_rank else (), t, dtype=t_dtype)
            start = time.perf_counter()
            out = self.unet.run(sample=model_in, timestep=timestep, encoder_hidden_states=context)[0]
            timings["unet"] = timings.get("unet", 0.0) + time.perf_counter() - start
            out = out.astype(np.float32)
            if uncond is not None:
                pos, neg = np.split(out, 2)
                out = neg + guidance_scale * (pos - neg)
            return x * c_skip + out * c_out

        return denoise

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 NHWC images in [0, 1], one image per VAE call to bound memory."""
        dtype = self.vae_decoder.input_dtypes["latent_sample"]
        images = [self.vae_decoder.run(latent_sample=(l[None] / self.scaling_factor).astype(dtype))[0]
                  for l in latents]
        return to_unit_nhwc(np.concatenate(images))

    def __call__(self, prompt, negative_prompt="", num_inference_steps: int = 20, guidance_scale: float = 7.0,
                 height: int | None = None, width: int | None = None, seed=None, latents=None,
                 num_images_per_prompt: int = 1, sampler: str = "Euler", schedule: str = "Automatic",
                 output_type: str = "pil", callback=None, rng: str = "cpu", **sampler_options) -> GenerationResult:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts) or not all(isinstance(p, str) for p in prompts + negatives):
            raise InvalidArgumentError("prompt must be a string or a non-empty list of strings, with one negative prompt each")
        height = self.folder.sample_size if height is None else height
        width = self.folder.sample_size if width is None else width
        check_size(height, width)
        steps = check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, 1, 64)
        guidance_scale = float(guidance_scale)
        if not math.isfinite(guidance_scale):
            raise InvalidArgumentError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise unknown_name("output_type", output_type, OUTPUT_TYPES)
        sampler = schedulers.resolve_sampler(sampler)
        schedule = schedulers.resolve_schedule(schedule)

        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        batch = len(prompts)
        shape = (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        seeds = image_seeds(seed, batch)
        generators = [make_generator(s, rng) for s in seeds]  # one stream per image, as A1111
        if latents is None:
            latents = np.stack([g.randn(shape[1:]) for g in generators])
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise InvalidArgumentError(f"latents must have shape {shape} for this size and batch, got {latents.shape}")
        step_noise = None
        if schedulers.noise_kind(sampler) == "gaussian":  # ancestral noise continues each image's stream
            def step_noise(*_):
                return np.stack([g.randn(shape[1:]) for g in generators])

        timings = {}
        start = time.perf_counter()
        use_cfg = guidance_scale > 1.0
        embeddings = self.encode_prompts(prompts + (negatives if use_cfg else []))
        cond, uncond = (np.split(embeddings, 2) if use_cfg else (embeddings, None))
        timings["text_encoder"] = time.perf_counter() - start

        sigmas = schedulers.sigmas_for(sampler, schedule, steps, self.sigma_table)
        denoise = self.make_denoiser(cond, uncond, guidance_scale, timings)
        init_scale, out_scale = schedulers.latent_scales(sampler, sigmas, schedule)
        x = latents * np.float32(init_scale)
        x = schedulers.sample(sampler, denoise, x, sigmas, seed=seeds, noise=step_noise, callback=callback,
                              **sampler_options)
        x = (x * out_scale).astype(np.float32)

        start = time.perf_counter()
        if output_type == "latent":
            images = x
        else:
            images = self.decode(x)
            images = to_pil(images) if output_type == "pil" else images
        timings["vae_decoder"] = time.perf_counter() - start
        infotexts = [self.infotext(p, n, steps, sampler, schedule, guidance_scale, s, width, height)
                     for p, n, s in zip(prompts, negatives, seeds)]
        return GenerationResult(images, infotexts, seeds, timings)

    def infotext(self, prompt, negative, steps, sampler, schedule, cfg, seed, width, height) -> str:
        params = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": _num(cfg),
                  "Seed": seed, "Size": f"{width}x{height}", "Model hash": self.model_hash,
                  "Model": self.model_name, "Version": "edgesd"}
        return create_infotext(prompt, negative, params)


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_size(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        v = check_int(name, v, 8, MAX_SIDE)
        if v % 8:
            raise InvalidArgumentError(f"{name} must be a multiple of 8, got {v}")


def image_seeds(seed, batch: int) -> list:
    """One seed per image: seed, seed + 1, ... (A1111); None or -1 picks a random seed."""
    if seed is None or (not isinstance(seed, (list, tuple)) and seed == -1):
        seed = random.randrange(2**32)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise InvalidArgumentError(f"got {len(seed)} seeds for {batch} images")
        seeds = [check_int("seed", s, 0, MAX_SEED) for s in seed]
    else:
        first = check_int("seed", seed, 0, MAX_SEED)
        seeds = [(first + i) % (MAX_SEED + 1) for i in range(batch)]
    return seeds
