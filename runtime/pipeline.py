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
from edgesd.errors import CheckpointError, InvalidArgumentError, NonFiniteError, unknown_name
from edgesd.models.contract import TINY_VAE_DECODER
from edgesd.runtime import providers as provider_names
from edgesd.runtime.images import to_pil, to_unit_nhwc
from edgesd.runtime import conditioning, hires, img2img, vae_tiling
from edgesd.runtime.deepcache import DeepCache, check_interval
from edgesd.runtime.graph_cache import cache_root
from edgesd.runtime.validation import check_int
from edgesd.runtime.infotext import call_arguments, create_infotext, parse_infotext
from edgesd.runtime.model_folder import LazySession, ModelFolder, low_memory_options
from edgesd.runtime.prompts import check_emphasis
from edgesd.runtime.seeds import RNG_LABELS, ImageNoise, check_variation, uses_eta_noise
from edgesd.runtime.tokenizer import ClipTokenizer

OUTPUT_TYPES = ("pil", "np", "latent")
PROVIDER_LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}
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

    def __init__(self, folder: ModelFolder, providers: list, low_memory: bool = False, engines=None,
                 io_binding: bool | None = None, tiny_vae: bool = False, graph_cache=False):
        self.tiny_vae = check_tiny_vae(folder, tiny_vae)
        self.graph_cache = cache_root(graph_cache)
        self.folder = folder
        self.providers = providers
        self.low_memory = bool(low_memory)
        self.engines = engines  # TensorRT: engines built for a shape profile (runtime/engines.py)
        self.io_binding = io_binding
        self.text_encoders = [conditioning.TextEncoder(folder.specs[e.name], ClipTokenizer(folder.path / e.tokenizer),
                                                       self.open_session(e.name))
                              for e in folder.family.text_encoders]
        self.tokenizer, self.text_encoder = self.text_encoders[0].tokenizer, self.text_encoders[0].session
        self.embeddings = {}  # textual inversion: prompt word -> Embedding
        self.zero_empty_negative = len(self.text_encoders) > 1 and folder.model_index.get(
            "force_zeros_for_empty_prompt", True)  # SDXL: an empty negative prompt is all zeros
        self.unet = self.open_session("unet")
        self.vae_decoder = self.open_session(TINY_VAE_DECODER if self.tiny_vae else "vae_decoder")
        self._vae_encoder = None
        self._unet_shallow = None
        scheduler = folder.configs["scheduler"]
        self.sigma_table = schedulers.sigma_table(
            scheduler.get("beta_schedule", "scaled_linear"), scheduler.get("beta_start", 0.00085),
            scheduler.get("beta_end", 0.012), scheduler.get("num_train_timesteps", 1000))
        self.scaling_factor = float(folder.configs["vae"].get("scaling_factor", 0.18215))
        self.latent_channels = int(folder.configs["unet"].get("out_channels", 4))
        self.unet_in_channels = int(folder.configs["unet"].get("in_channels", self.latent_channels))
        self.vae_scale = 2 ** (len(folder.configs["vae"]["block_out_channels"]) - 1)
        self.model_name = folder.path.name
        source = (folder.manifest or {}).get("source", {})
        self.model_hash = source.get("sha256", "")[:10] or None

    @classmethod
    def from_pretrained(cls, path: str | Path, provider: str = "auto", low_memory: bool = False, *,
                        device_id: int = 0, gpu_mem_limit: int | None = None, arena_extend_strategy: str | None = None,
                        cudnn_conv_algo_search: str | None = None, cuda_graph: bool = False,
                        io_binding: bool | None = None, profile=None, engine_cache=None,
                        allow_rebuild: bool = False, tiny_vae: bool = False, graph_cache=False) -> "Pipeline":
        """`low_memory`: hold one component's weights at a time (each is loaded when its stage
        starts and freed when it ends), no memory arenas, and tiled VAE decoding/encoding:
        the peak is about the largest component instead of all of them, for a reload per stage.

        GPU options (runtime/providers.py): `device_id`, `gpu_mem_limit` (bytes),
        `arena_extend_strategy`, `cudnn_conv_algo_search`, and `cuda_graph`, which captures the
        UNet as one CUDA graph (one image size and batch per loaded pipeline). `io_binding`:
        keep inputs and outputs on the device between runs (None: on GPU providers).
        TensorRT: `profile` (a ShapeProfile or "512x512") picks built engines, else the ones built
        last; `engine_cache` is their folder; `allow_rebuild` builds what is missing (runtime/engines.py).
        `tiny_vae`: decode with the TAESD graph the folder was exported with (`edgesd export --tiny-vae`),
        ~50x cheaper than the full VAE decoder, at a quality cost; img2img still encodes with the full VAE.
        `graph_cache` (CPU provider): True, or a folder, keeps each graph as onnxruntime optimized it
        for this CPU and loads that next time (SD1.5: 15 s to load, then about 5 s), at the cost of a
        copy of the weights on disk; True puts it in $EDGESD_CACHE/graphs (runtime/graph_cache.py).
        """
        from edgesd.runtime import engines

        providers = provider_names.resolve(provider, device_id=device_id, gpu_mem_limit=gpu_mem_limit,
                                           arena_extend_strategy=arena_extend_strategy,
                                           cudnn_conv_algo_search=cudnn_conv_algo_search, cuda_graph=cuda_graph)
        if cuda_graph and "CUDAExecutionProvider" not in provider_names.names(providers):
            raise InvalidArgumentError("cuda_graph=True needs the cuda provider")
        folder = ModelFolder.open(path)
        engine_set, providers = engines.for_pipeline(
            folder, providers, explicit=str(provider).lower() == "tensorrt", profile=profile,
            cache_root=engine_cache, allow_rebuild=allow_rebuild, device_id=device_id)
        return cls(folder, providers, low_memory, engine_set, io_binding, tiny_vae, graph_cache)

    def open_session(self, component: str):
        """The component's session: opened now, or on first use in low-memory mode. Only the
        UNet, which runs at every step, is captured as a CUDA graph."""
        if self.engines is not None:
            return self.engines.guarded(component, lambda chosen: self._session(component, chosen))
        providers = self.providers if component == "unet" else provider_names.without_cuda_graph(self.providers)
        return self._session(component, providers)

    def _session(self, component: str, providers: list):
        if self.low_memory:
            return LazySession(self.folder, component, providers, low_memory_options, self.io_binding,
                               self.graph_cache)
        return self.folder.session(component, providers, io_binding=self.io_binding, graph_cache=self.graph_cache)

    @property
    def host_idle_during_unet(self) -> bool:
        """True when the UNet runs on a GPU: the next step's noise is then drawn on a
        worker thread while it runs (on the CPU provider that would only take cores from
        the UNet)."""
        return provider_names.names(self.providers)[0] != "CPUExecutionProvider"  # without opening a lazy UNet

    def prefetch_image_noise(self, sampler: str) -> bool:
        """Draw the images' step noise ahead: on a GPU, for samplers that take some at each step."""
        return self.host_idle_during_unet and schedulers.noise_kind(sampler) == "gaussian"

    @property
    def provider(self) -> str:
        """The provider the UNet runs on, as onnxruntime reports it (e.g. CUDAExecutionProvider)."""
        return self.unet.provider

    def stage_done(self, stage: str) -> None:
        """Low-memory mode frees a stage's sessions when it ends (reopened if needed again)."""
        if self.low_memory:
            stage_sessions = [e.session for e in self.text_encoders] if stage == "text_encoder" else [getattr(self, stage)]
            if stage == "unet" and self._unet_shallow is not None:
                stage_sessions.append(self._unet_shallow)
            for session in stage_sessions:
                session.release()

    # -- text -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list, *, emphasis: str = "Original", clip_skip: int | None = None) -> np.ndarray:
        """(len(prompts), 77 * k, hidden) conditioning with A1111's emphasis, BREAK and 75-token chunks.

        Every row gets the same chunk count k (shorter prompts are padded with the empty prompt's
        chunk), so prompts and negative prompts encoded in one call share a UNet batch. All
        chunks go through each text encoder in one batched call (see runtime/conditioning.py).
        """
        return self.encode_text(prompts, emphasis=emphasis, clip_skip=clip_skip).context

    def encode_text(self, prompts: list, *, emphasis: str = "Original", clip_skip: int | None = None):
        """The `Conditioning` of `prompts`: context, and the pooled text for SDXL."""
        clip_skip = self.folder.family.default_clip_skip if clip_skip is None else clip_skip
        return conditioning.encode(prompts, self.text_encoders, emphasis=emphasis, clip_skip=clip_skip,
                                   embeddings=self.embeddings)

    def load_embedding(self, path, token: str | None = None):
        """Load a textual inversion file; the prompt word `token` (default: the file name) then
        stands for its vectors. Returns the Embedding. See runtime/embeddings.py for the formats."""
        from edgesd.runtime.embeddings import load_embedding

        encoders = [(self.folder.family.text_encoder(e.spec.name), e.spec.hidden_size)
                    for e in self.text_encoders]
        embedding = load_embedding(path, encoders, token)
        for encoder in self.text_encoders:
            encoder.embedding_feed((1, 1), [], {})  # refuses folders whose graphs cannot take the vectors
        chunk = self.tokenizer.max_length - 2
        if not self.tokenizer.encode(embedding.name):
            raise InvalidArgumentError(f"embedding name {embedding.name!r} has no tokens")
        if embedding.length > chunk:
            raise CheckpointError(f"{path}: {embedding.length} vectors do not fit in a {chunk}-token chunk")
        self.embeddings[embedding.name] = embedding
        return embedding

    def condition(self, prompts: list, negatives: list | None, *, emphasis: str, clip_skip: int) -> tuple:
        """(cond, uncond) Conditioning; uncond is None without CFG. SDXL (force_zeros_for_empty_prompt):
        when every negative prompt is empty, uncond is all zeros, as A1111 and diffusers do."""
        if not self.applies_clip_skip():
            clip_skip = self.folder.family.default_clip_skip
        zero_negatives = negatives is not None and self.zero_empty_negative and not any(negatives)
        texts = prompts + (negatives if negatives is not None and not zero_negatives else [])
        encoded = self.encode_text(texts, emphasis=emphasis, clip_skip=clip_skip)
        cond = encoded.rows(0, len(prompts))
        if negatives is None:
            return cond, None
        return cond, cond.zeros() if zero_negatives else encoded.rows(len(prompts), len(texts))

    def check_clip_skip(self, clip_skip) -> int:
        """A1111's Clip skip (1 = last layer; None: the family's default); a value other than the
        default needs text encoders with `clip_skip_hidden_state`."""
        if clip_skip is None:
            return self.folder.family.default_clip_skip
        layers = min(int(self.folder.configs[e.spec.name].get("num_hidden_layers", 12)) for e in self.text_encoders)
        clip_skip = check_int("clip_skip", clip_skip, 1, layers)
        if self.applies_clip_skip():
            for encoder in self.text_encoders:
                encoder.hidden_output(clip_skip)
        return clip_skip

    def applies_clip_skip(self) -> bool:
        """A1111 applies Clip skip to CLIP ViT-L text encoders (SD1); with SD2's OpenCLIP one it has no
        effect, though the infotext still records it. SDXL: both encoders, as diffusers does."""
        return self.folder.family.clip_skip_applies

    # -- sampling ---------------------------------------------------------------------

    @property
    def unet_shallow(self):
        """DeepCache's shallow UNet session, opened on first use (only deepcache_interval > 1 needs it)."""
        if self._unet_shallow is None:
            self._unet_shallow = self.open_session("unet_shallow")
        return self._unet_shallow

    def make_denoiser(self, cond, uncond, guidance_scale: float, timings: dict,
                      image_cond: np.ndarray | None = None, time_ids: np.ndarray | None = None,
                      deepcache_interval: int = 1):
        """The `denoise(x, sigma) -> x0` callable over the UNet, with CFG when `uncond` is given.
        `deepcache_interval` N > 1: the full UNet every N calls, DeepCache's shallow pass between
        (runtime/deepcache.py); the cache lives in this denoiser, so each sampling run starts full.

        `cond`/`uncond` are Conditioning (or plain context arrays). `image_cond` (inpainting models:
        mask + masked-image latent) is appended to the scaled latent's channels unscaled, as LDM's
        hybrid conditioning and diffusers do. SDXL also gets the pooled text and `time_ids` (the same
        for every row, cond and uncond alike)."""
        self.stage_done("text_encoder")  # the prompts are encoded by now
        table, prediction = self.sigma_table, self.folder.prediction_type
        dtype = self.unet.input_dtypes["sample"]
        rows = [c if isinstance(c, conditioning.Conditioning) else conditioning.Conditioning(c)
                for c in (cond, uncond) if c is not None]
        both = conditioning.concat(*rows)
        context = both.context.astype(self.unet.input_dtypes["encoder_hidden_states"])
        context.flags.writeable = False  # the same read-only array every step: IOBinding keeps it on the device
        added = {}
        if both.pooled is not None:
            added = {"text_embeds": both.pooled, "time_ids": np.repeat(time_ids[None], len(both.pooled), axis=0)}
        t_rank, t_dtype = self.unet.input_ranks["timestep"], self.unet.input_dtypes["timestep"]
        host_idle = self.host_idle_during_unet
        if deepcache_interval > 1:
            run_unet = DeepCache(self.unet, self.unet_shallow, deepcache_interval).run
        else:
            first = self.unet.output_names[:1]  # out_sample only, also where the graph has deep_features

            def run_unet(**feeds):
                return self.unet.run(outputs=first, **feeds)[0]

        def denoise(x, sigma):
            c_skip, c_out, c_in = schedulers.scalings(float(sigma), prediction)
            t = float(schedulers.sigma_to_t(float(sigma), table))
            if np.issubdtype(t_dtype, np.integer):
                t = round(t)
            model_in = (x * c_in).astype(dtype)
            if image_cond is not None:
                model_in = np.concatenate([model_in, image_cond.astype(dtype)], axis=1)
            if uncond is not None:
                model_in = np.concatenate([model_in, model_in])
            timestep = np.full((len(model_in),) if t_rank else (), t, dtype=t_dtype)
            if host_idle:  # the step noise queued ahead is drawn while the UNet runs
                schedulers.normal.host_idle()
            start = time.perf_counter()
            out = run_unet(sample=model_in, timestep=timestep, encoder_hidden_states=context, **added)
            timings["unet"] = timings.get("unet", 0.0) + time.perf_counter() - start
            out = out.astype(np.float32)
            if uncond is not None:
                pos, neg = np.split(out, 2)
                out = neg + guidance_scale * (pos - neg)
            return x * c_skip + out * c_out

        return denoise

    def decode(self, latents: np.ndarray, tiling: bool = False) -> np.ndarray:
        """Latents -> float32 NHWC images in [0, 1], one image per VAE call to bound memory.

        `tiling`: decode latents larger than the model's sample size in overlapping tiles
        (runtime/vae_tiling.py), bounding memory further for large images."""
        self.stage_done("unet")  # sampling is over (a hires pass reopens it)
        dtype = self.vae_decoder.input_dtypes["latent_sample"]

        def run(latent):
            return self.vae_decoder.run(latent_sample=(latent / self.scaling_factor).astype(dtype))[0]

        tile = self.folder.sample_size // self.vae_scale
        tiling = tiling or self.low_memory
        if not np.isfinite(latents).all():
            raise NonFiniteError("the UNet produced NaN or infinite latents (fp16 overflow?); use an fp32 export "
                                 "(edgesd export --precision fp32) or a lower CFG scale")
        images = [vae_tiling.tiled_decode(run, l[None], tile, self.vae_scale)
                  if tiling and vae_tiling.needs_tiling(l, tile) else run(l[None]) for l in latents]
        self.stage_done("vae_decoder")
        images = np.concatenate(images)
        if not np.isfinite(images).all():
            raise NonFiniteError("the VAE decoder produced NaN or infinite pixels (fp16 overflow); export the VAE "
                                 "in fp32 (edgesd export --vae-precision fp32, the default)")
        return to_unit_nhwc(images)

    def __call__(self, prompt, negative_prompt="", num_inference_steps: int = 20, guidance_scale: float = 7.0,
                 height: int | None = None, width: int | None = None, seed=None, latents=None,
                 num_images_per_prompt: int = 1, sampler: str = "Euler", schedule: str = "Automatic",
                 output_type: str = "pil", callback=None, rng: str = "cpu", subseed=None,
                 subseed_strength: float = 0.0, ensd: int = 0, init_image=None, strength: float | None = None,
                 mask_image=None, mask_blur: float = 4, inpainting_fill: str = "original",
                 clip_skip: int | None = None, emphasis: str = "Original", vae_tiling: bool = False,
                 enable_hr: bool = False, hr_scale: float = 2.0, hr_upscaler: str = "Latent",
                 hr_second_pass_steps: int = 0, hr_denoising_strength: float = 0.7,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, deepcache_interval: int = 1,
                 **sampler_options) -> GenerationResult:
        """txt2img; img2img with `init_image` (+ `strength`); inpainting with `mask_image` too.

        `subseed`/`subseed_strength` are A1111's variation seed, `ensd` its eta noise seed
        delta, `rng` the noise source ("cpu" or "nv"); see runtime/seeds.py. `clip_skip` is
        A1111's Clip skip (1 = last layer; None: the family's default) and `emphasis` how
        `(word:1.2)` weights apply ("Original", "No norm", "Ignore", "None"); see runtime/prompts.py.
        `vae_tiling` decodes large images in overlapping tiles (runtime/vae_tiling.py).
        `enable_hr` adds A1111's hires fix (runtime/hires.py): the image is generated at
        height x width, upscaled by `hr_scale` with `hr_upscaler`, then refined by an img2img
        pass of `hr_second_pass_steps` (0: as many as the first) at `hr_denoising_strength`.
        SDXL: `original_size`, `crops_coords_top_left` and `target_size` ((height, width) pairs in
        pixels; the sizes default to the image's) become the UNet's `time_ids`, as in diffusers.
        `deepcache_interval` N > 1 (folders exported with --deepcache): the full UNet runs every N model
        calls, the first always, and DeepCache's shallow pass in between (runtime/deepcache.py).
        """
        prompts, negatives = check_prompts(prompt, negative_prompt)
        strength = self.check_img2img(init_image, strength, mask_image, inpainting_fill)
        if init_image is not None and (height is None or width is None):
            width, height = img2img.default_size(init_image)
        height = self.folder.sample_size if height is None else height
        width = self.folder.sample_size if width is None else width
        check_size(height, width)
        steps = check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, 1, 64)
        guidance_scale = check_finite("guidance_scale", guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise unknown_name("output_type", output_type, OUTPUT_TYPES)
        sampler = schedulers.resolve_sampler(sampler)
        schedule = schedulers.resolve_schedule(schedule)
        subseed_strength, ensd = check_variation(subseed_strength, ensd)
        clip_skip, emphasis = self.check_clip_skip(clip_skip), check_emphasis(emphasis)
        deepcache_interval = check_interval(deepcache_interval, self.folder)
        sizes = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size)
        size_ids = conditioning.time_ids(height, width, **sizes)
        hr = None
        if enable_hr:
            if init_image is not None:
                raise InvalidArgumentError("hires fix is a txt2img option; it cannot be combined with init_image")
            hr = hires.check_hires(hr_scale, hr_upscaler, hr_second_pass_steps, hr_denoising_strength, steps)

        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        batch = len(prompts)
        shape = (batch, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        # A1111: with a variation seed every image keeps the seed and the subseeds count up.
        seeds = image_seeds(seed, batch, step=0 if subseed_strength else 1)
        subseeds = image_seeds(subseed, batch) if subseed_strength else None
        noise = ImageNoise(shape[1:], seeds, rng, subseeds, subseed_strength, ensd,  # one stream per image
                           prefetch=self.prefetch_image_noise(sampler))
        initial = noise.first()
        latents = initial if latents is None else np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise InvalidArgumentError(f"latents must have shape {shape} for this size and batch, got {latents.shape}")
        if not np.isfinite(latents).all():
            raise InvalidArgumentError("latents hold NaN or infinite values")
        # ancestral noise continues each image's stream (or its seed + ENSD stream)
        step_noise = noise.next if schedulers.noise_kind(sampler) == "gaussian" else None

        timings = {}
        start = time.perf_counter()
        use_cfg = guidance_scale > 1.0
        cond, uncond = self.condition(prompts, negatives if use_cfg else None, emphasis=emphasis, clip_skip=clip_skip)
        timings["text_encoder"] = time.perf_counter() - start

        sigmas = schedulers.sigmas_for(sampler, schedule, steps, self.sigma_table)
        init_scale, out_scale = schedulers.latent_scales(sampler, sigmas, schedule)
        job = None if init_image is None else self.prepare_img2img(
            init_image, mask_image, width, height, shape, mask_blur, inpainting_fill, seeds, rng, timings,
            bool(vae_tiling))
        denoise = self.make_denoiser(cond, uncond, guidance_scale, timings,
                                     self.image_conditioning(job, shape, width, height), size_ids, deepcache_interval)
        if job is None:
            x = latents * np.float32(init_scale)
        else:
            sigmas = sigmas[img2img.start_index(steps, strength):]
            x = (job.latent + latents * np.float32(sigmas[0])).astype(np.float32)
            if job.mask is not None:
                denoise = img2img.masked_denoiser(denoise, job.latent, job.mask.latent)
        x = schedulers.sample(sampler, denoise, x, sigmas, seed=seeds, noise=step_noise, callback=callback,
                              noise_ahead=self.host_idle_during_unet, **sampler_options)
        if job is not None and job.mask is not None:
            x = x * job.mask.latent + job.latent * (1 - job.mask.latent)
        x = (x * out_scale).astype(np.float32)
        if hr is not None:
            hr_size = hires.target_size(width, height, hr.scale)  # A1111: SDXL's sizes are the hires pass's
            hr_ids = conditioning.time_ids(hr_size[1], hr_size[0], **sizes)
            x = self.hires_pass(x, hr, width, height, (seeds, rng, subseeds, subseed_strength, ensd),
                                sampler, schedule, self.make_denoiser(cond, uncond, guidance_scale, timings,
                                                                      time_ids=hr_ids,
                                                                      deepcache_interval=deepcache_interval),
                                callback, sampler_options, vae_tiling)

        start = time.perf_counter()
        if output_type == "latent":
            images = x
        else:
            images = self.decode(x, tiling=bool(vae_tiling))
            if job is not None and job.mask is not None:
                images = img2img.paste_back(images, job.original, job.mask.overlay)
            images = to_pil(images) if output_type == "pil" else images
        timings["vae_decoder"] = time.perf_counter() - start
        extras = self.extra_params(sampler, sampler_options, rng, subseed_strength, ensd, strength,
                                   mask_image is not None and mask_blur)
        extras.update(prompt_params(prompts + negatives, clip_skip, emphasis))
        extras.update(deepcache_params(deepcache_interval, self.folder.deepcache))
        if hr is not None:
            extras.update(hires.infotext_fields(hr))
        infotexts = [self.infotext(p, n, steps, sampler, schedule, guidance_scale, s, width, height,
                                   {"Variation seed": sub, **extras} if subseeds else extras)
                     for p, n, s, sub in zip(prompts, negatives, seeds, subseeds or seeds)]
        return GenerationResult(images, infotexts, seeds, timings)

    def hires_pass(self, x, hr, width, height, noise_args, sampler, schedule, denoise, callback,
                   sampler_options, tiling) -> np.ndarray:
        """The hires fix's second pass on first-pass latents `x`, as A1111's sample_hr_pass:
        upscale, fresh noise from the images' seeds at the new size, then img2img."""
        width, height = hires.target_size(width, height, hr.scale)
        shape = (len(x), self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        if hr.upscaler in hires.LATENT_MODES:
            latent = hires.resize_latents(x, shape[2], shape[3], hires.LATENT_MODES[hr.upscaler])
        else:
            pixels = hires.resize_images(self.decode(x, tiling=bool(tiling)), width, height, hr.upscaler)
            latent = np.concatenate([self.encode_image(p[None], bool(tiling)) for p in pixels])
        noise = ImageNoise(shape[1:], *noise_args, prefetch=self.prefetch_image_noise(sampler))
        sigmas = schedulers.sigmas_for(sampler, schedule, hr.steps, self.sigma_table)
        sigmas = sigmas[img2img.start_index(hr.steps, hr.strength):]
        x = (latent + noise.first() * np.float32(sigmas[0])).astype(np.float32)
        step_noise = noise.next if schedulers.noise_kind(sampler) == "gaussian" else None
        x = schedulers.sample(sampler, denoise, x, sigmas, seed=noise.seeds, noise=step_noise, callback=callback,
                              noise_ahead=self.host_idle_during_unet, **sampler_options)
        return (x * schedulers.latent_scales(sampler, sigmas, schedule)[1]).astype(np.float32)

    # -- img2img ----------------------------------------------------------------------

    @property
    def vae_encoder(self):
        """The encoder session, opened on first use (txt2img never needs it)."""
        if self._vae_encoder is None:
            self._vae_encoder = self.open_session("vae_encoder")
        return self._vae_encoder

    def encode_image(self, pixels: np.ndarray, tiling: bool = False) -> np.ndarray:
        """(N, 3, H, W) in [-1, 1] -> scaled latents: the posterior mean times the scaling factor.

        The mean, not a sample: A1111 samples from the unseeded global torch RNG, which no
        seed reproduces; a trained VAE's posterior spread is far below what a seed changes.
        `tiling`: encode images larger than the model's sample size in overlapping tiles.
        """
        dtype = self.vae_encoder.input_dtypes["sample"]

        def run(tile):
            return self.vae_encoder.run(["latent_parameters"], sample=tile.astype(dtype))[0]

        tile = self.folder.sample_size // self.vae_scale
        if (tiling or self.low_memory) and vae_tiling.needs_tiling(pixels, tile * self.vae_scale):
            params = vae_tiling.tiled_encode(run, pixels, tile, self.vae_scale)
        else:
            params = run(pixels).astype(np.float32)
        self.stage_done("vae_encoder")
        return params[:, : self.latent_channels] * np.float32(self.scaling_factor)

    def check_img2img(self, init_image, strength, mask_image, fill) -> float | None:
        """Validated strength (default 0.75) when there is an init image; refuses stray img2img options."""
        if init_image is None:
            if strength is not None or mask_image is not None:
                raise InvalidArgumentError("strength and mask_image need an init_image (img2img / inpainting)")
            return None
        img2img.check_fill(fill)
        return img2img.check_strength(0.75 if strength is None else strength)

    def prepare_img2img(self, init_image, mask_image, width, height, shape, mask_blur, fill, seeds, rng, timings,
                        tiling=False):
        """Encode the init image (once, shared by the batch); prepare the mask and the fill."""
        start = time.perf_counter()
        pixels = img2img.image_tensor(init_image, width, height)
        latent = np.repeat(self.encode_image(pixels, tiling), shape[0], axis=0)
        timings["vae_encoder"] = time.perf_counter() - start
        mask = None
        if mask_image is not None:
            mask = img2img.prepare_mask(mask_image, width, height, float(mask_blur), shape[2:])
            fill_noise = ImageNoise(shape[1:], seeds, rng).first() if fill == "latent noise" else None
            latent = img2img.fill_latent(latent, mask.latent, fill, fill_noise).astype(np.float32)
        original = (pixels[0].transpose(1, 2, 0) + 1) / 2
        return img2img.Job(latent, mask, original)

    def image_conditioning(self, job, shape, width, height) -> np.ndarray | None:
        """Inpainting models' extra UNet input: (batch, 1 + C, h, w) mask and masked-image latent.

        A1111: the masked image is the init image times (1 - rounded mask), VAE-encoded; with no
        mask (txt2img, plain img2img) the mask is all ones, so the masked image is all zeros
        (A1111 encodes a 0.5-gray image, which is 0 in [-1, 1]). Regular models: None.
        """
        if self.unet_in_channels == self.latent_channels:
            return None
        keep = None if job is None or job.mask is None else 1 - np.round(job.mask.pixel)
        pixels = np.zeros((1, 3, height, width), np.float32) if keep is None else (
            (job.original.transpose(2, 0, 1)[None] * 2 - 1) * keep).astype(np.float32)
        latent = self.encode_image(pixels)
        mask = np.ones(shape[2:], np.float32) if keep is None else img2img.nearest(1 - keep, shape[2:])
        cond = np.concatenate([mask[None, None], latent], axis=1)
        return np.repeat(cond, shape[0], axis=0)

    def extra_params(self, sampler, options, rng, subseed_strength, ensd, strength, mask_blur) -> dict:
        """Infotext fields beyond the basic ones, written only when they apply (as A1111)."""
        return {"Variation seed strength": _num(subseed_strength) if subseed_strength else None,
                "Denoising strength": _num(strength) if strength is not None else None,
                "Mask blur": _num(mask_blur) if mask_blur else None,
                "ENSD": ensd if ensd and uses_eta_noise(sampler, options) else None,
                "RNG": RNG_LABELS[rng], **({"Eta": _num(options["eta"])} if "eta" in options else {})}

    def infotext(self, prompt, negative, steps, sampler, schedule, cfg, seed, width, height, extras=None) -> str:
        params = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": _num(cfg),
                  "Seed": seed, "Size": f"{width}x{height}", "Model hash": self.model_hash,
                  "Model": self.model_name, "VAE": "TAESD" if self.tiny_vae else None, **(extras or {}),
                  "Provider": PROVIDER_LABELS.get(self.provider), "Version": "edgesd"}
        return create_infotext(prompt, negative, params)

    def infotext_params(self, text: str) -> dict:
        """Keyword arguments that make `self(**kwargs)` regenerate the image an infotext describes."""
        return call_arguments(parse_infotext(text))


def check_tiny_vae(folder: ModelFolder, tiny_vae) -> bool:
    """`tiny_vae=True` needs the TAESD graph that `edgesd export --tiny-vae` adds."""
    if not isinstance(tiny_vae, bool):
        raise InvalidArgumentError(f"tiny_vae must be True or False, got {tiny_vae!r}")
    if tiny_vae and not folder.has(TINY_VAE_DECODER):
        raise InvalidArgumentError(f"{folder.path}: this folder has no TAESD decoder ({TINY_VAE_DECODER}); export it "
                                   "with `edgesd export CHECKPOINT -o OUT --tiny-vae taesd_decoder.safetensors`")
    return tiny_vae


def prompt_params(texts: list, clip_skip: int, emphasis: str) -> dict:
    """A1111's infotext fields for text encoding: Clip skip when > 1, Emphasis when not the
    default and some prompt has brackets."""
    bracketed = any("(" in t or "[" in t for t in texts)
    return {"Clip skip": clip_skip if clip_skip > 1 else None,
            "Emphasis": emphasis if emphasis != "Original" and bracketed else None}


def deepcache_params(interval: int, cut) -> dict:
    """Infotext fields of DeepCache, written only when it ran (interval > 1)."""
    if interval <= 1:
        return {}
    return {"DeepCache interval": interval, "DeepCache branch": cut.branch}


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def check_prompts(prompt, negative_prompt) -> tuple:
    """(prompts, negatives) as equal-length lists of strings, or a one-line error."""
    def as_list(value):
        return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None

    prompts, negatives = as_list(prompt), as_list(negative_prompt)
    if prompts is not None and isinstance(negative_prompt, str):
        negatives = negatives * len(prompts)
    if (not prompts or negatives is None or len(negatives) != len(prompts)
            or not all(isinstance(p, str) for p in prompts + negatives)):
        raise InvalidArgumentError("prompt must be a string or a non-empty list of strings, with one negative "
                                   f"prompt each; got {type(prompt).__name__}")
    return prompts, negatives


def check_finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return number


def check_size(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        v = check_int(name, v, 8, MAX_SIDE)
        if v % 8:
            raise InvalidArgumentError(f"{name} must be a multiple of 8, got {v}")


def image_seeds(seed, batch: int, step: int = 1) -> list:
    """One seed per image: seed, seed + step, ... (A1111); None or -1 picks a random seed."""
    if seed is None or (not isinstance(seed, (list, tuple)) and seed == -1):
        seed = random.randrange(2**32)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise InvalidArgumentError(f"got {len(seed)} seeds for {batch} images")
        seeds = [check_int("seed", s, 0, MAX_SEED) for s in seed]
    else:
        first = check_int("seed", seed, 0, MAX_SEED)
        seeds = [(first + i * step) % (MAX_SEED + 1) for i in range(batch)]
    return seeds
