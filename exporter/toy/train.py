"""Train the toy model and its adapters, and write the committed artefacts.

    python -m edgesd.exporter.toy.train            # full run (about 44 min on one quiet CPU core)
    python -m edgesd.exporter.toy.train --quick -o /tmp/toy --config /tmp/toy-config
    python -m edgesd.exporter.toy.train --stages lora,hypernetwork   # adapters on the committed base

Stages, all seeded (same seed, same machine, same files): VAE; UNet + text encoder (on the
VAE encoder's latents); the VAE's decoder again on whole images (encoder frozen); a kohya
LoRA that adds stripes; an A1111 hypernetwork that outlines. Writes the LDM single file
(fp16), the LoRA, the hypernetwork and `training.json` (steps, losses, wall times) into the
output folder, and the measured latent scaling factor into the config's VAE. Every stage
after the VAE trains on the checkpoint as written (fp16), from its own seeded stream, and
reads only what no later stage changes (the UNet and the adapters read the encoder's latents,
the decoder stage the images), so a partial run such as `--stages unet,lora` gives a full
run's files. The decoder stage alone continues from the checkpoint's decoder: a full run's
decoder comes from `--stages vae,decoder`, not from `--stages decoder` on a finished checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from edgesd.errors import CheckpointError, InvalidArgumentError
from edgesd.exporter.toy.hypernetwork import LAYER_STRUCTURE
from edgesd.models.toy.artefacts import ARTEFACTS
from edgesd.models.toy.scenes import OUTLINE_WIDTH

HERE = Path(__file__).resolve().parents[2]


STAGES = ("vae", "unet", "decoder", "lora", "hypernetwork")


@dataclass
class Plan:
    pool: int = 12000
    vae_steps: int = 5000
    vae_batch: int = 16
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    unet_ema: float = 0.995
    decoder_steps: int = 1500
    decoder_batch: int = 8
    decoder_lr: float = 5e-4
    decoder_style_shares: tuple | None = None  # (filled, striped, outlined) drawn in these shares; None: the pool's
    lora_steps: int = 900
    lora_rank: int = 8
    lora_lr: float = 1e-2
    lora_max_timestep: int = 1000
    lora_text: bool = True
    hyper_steps: int = 600
    hyper_lr: float = 3e-3
    hyper_max_timestep: int = 600
    hyper_layers: tuple = tuple(LAYER_STRUCTURE)
    hyper_drop_caption: float = 0.1  # empty captions too: A1111 applies the hypernetwork to CFG's unconditional context
    hyper_outline_width: int = 4  # its style's contour, a pixel wider than the base model's outlines
    adapter_batch: int = 16


QUICK = Plan(pool=200, vae_steps=5, unet_steps=5, decoder_steps=3, lora_steps=3, hyper_steps=3)


def build(configs: dict) -> tuple:
    """(vae, unet, text encoder), freshly initialised from the global torch seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from edgesd.exporter.synth import text_model
    from edgesd.models.families import FAMILIES

    encoder = FAMILIES["sd1"].text_encoders[0]
    return (AutoencoderKL.from_config(configs["vae"]), UNet2DConditionModel.from_config(configs["unet"]),
            text_model(configs["text_encoder"], encoder))


def save_checkpoint(configs, unet, vae, text, out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from edgesd.exporter.synth import ldm_state_dict
    from edgesd.models.families import FAMILIES

    state = ldm_state_dict(FAMILIES["sd1"], configs, unet, vae, (text,))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    save_file(state, str(out), metadata={"format": "pt", "edgesd_toy": f"seed{seed}"})


def stage_seed(seed: int, stage: str) -> int:
    """The VAE stage draws from `seed` itself; each later stage from its own stream, so a
    stage rerun alone (`--stages lora`) gets exactly the draws of a full run."""
    return seed if stage == "vae" else zlib.crc32(f"{seed}:{stage}".encode())


def stage_generator(seed: int, stage: str):
    import torch

    return torch.Generator().manual_seed(stage_seed(seed, stage))


def seed_initialisation(seed: int, stage: str) -> None:
    """Seed torch's global generator, which new modules draw their initial weights from; called
    right before a stage creates modules, so loading the checkpoint (whose draws depend on the
    diffusers version) does not shift them."""
    import torch

    torch.manual_seed(stage_seed(seed, stage))


def train_vae_stage(out: Path, config: Path, plan: Plan, seed: int, scenes, images, log, device="cpu") -> dict:
    """The VAE and its measured latent scaling factor (written into the config); saves the
    checkpoint with the UNet and text encoder as initialised. Returns {"loss", "scaling_factor"}."""
    from edgesd.exporter.toy.vae import encode_means, train_vae
    from edgesd.models.families import load_configs

    configs = load_configs(config)
    seed_initialisation(seed, "vae")
    vae, unet, text = build(configs)
    loss = train_vae(vae.to(device), images, steps=plan.vae_steps, batch=plan.vae_batch, lr=2e-3,
                     generator=stage_generator(seed, "vae"), log=log)
    vae = vae.cpu()
    scale = round(float(1 / encode_means(vae, images).std()), 5)
    vae_config_path = config / "vae" / "config.json"
    vae_config = json.loads(vae_config_path.read_text())
    vae_config_path.write_text(json.dumps(dict(vae_config, scaling_factor=scale), indent=2) + "\n")
    configs["vae"]["scaling_factor"] = scale
    save_checkpoint(configs, unet, vae, text, out / ARTEFACTS["checkpoint"], seed)
    return {"loss": loss, "scaling_factor": scale}


def train_unet_stage(out: Path, config: Path, plan: Plan, seed: int, scenes, images, log, device="cpu") -> float:
    """A fresh UNet + text encoder on the checkpoint's encoder latents (scaled); rewrites the
    checkpoint, keeping its VAE. Returns the final loss."""
    from edgesd.exporter.load import load_model
    from edgesd.exporter.toy.data import Tokens, captions
    from edgesd.exporter.toy.diffusion import train_diffusion
    from edgesd.exporter.toy.vae import encode_means

    model = load_model(out / ARTEFACTS["checkpoint"], config=config)
    vae = model.vae.float().eval()
    seed_initialisation(seed, "unet")
    _, unet, text = build(model.configs)
    latents = encode_means(vae, images) * model.configs["vae"]["scaling_factor"]
    tokens = Tokens()
    unet, text = unet.to(device), text.to(device)
    loss = train_diffusion(unet, text, latents.to(device), tokens(captions(scenes)).to(device),
                           tokens([""])[0].to(device), steps=plan.unet_steps, batch=plan.unet_batch, lr=plan.unet_lr,
                           generator=stage_generator(seed, "unet"), log=log, ema_decay=plan.unet_ema)
    save_checkpoint(model.configs, unet.cpu(), vae, text.cpu(), out / ARTEFACTS["checkpoint"], seed)
    return loss


def train_decoder_stage(out: Path, config: Path, plan: Plan, seed: int, scenes, images, log, device="cpu") -> float:
    """Fine-tunes the checkpoint's decoder and rewrites the checkpoint; returns the final loss."""
    from edgesd.exporter.load import load_model
    from edgesd.exporter.toy.data import style_weights
    from edgesd.exporter.toy.vae import train_decoder

    model = load_model(out / ARTEFACTS["checkpoint"], config=config)
    unet, vae, text = (m.float() for m in (model.unet, model.vae, model.text_encoder))
    loss = train_decoder(vae.to(device), images, steps=plan.decoder_steps, batch=plan.decoder_batch,
                         lr=plan.decoder_lr, generator=stage_generator(seed, "decoder"), log=log,
                         weights=None if plan.decoder_style_shares is None else
                         style_weights(scenes, plan.decoder_style_shares))
    save_checkpoint(model.configs, unet, vae.cpu(), text, out / ARTEFACTS["checkpoint"], seed)
    return loss


def frozen_base(out: Path, config: Path, scenes, images, style: str, device="cpu", outline_width=OUTLINE_WIDTH):
    """(unet, text encoder, scaled latents, plain-caption ids) of the `style` scenes on `device`,
    from the checkpoint in `out` as saved (fp16 weights, as the export will read them); outlined
    scenes rendered again with another contour width if `outline_width` says so."""
    import numpy as np

    from edgesd.exporter.load import load_model
    from edgesd.exporter.toy.data import Tokens, captions
    from edgesd.exporter.toy.vae import encode_means
    from edgesd.models.toy.scenes import render

    model = load_model(out / ARTEFACTS["checkpoint"], config=config)
    unet, vae, text = (m.float().eval() for m in (model.unet, model.vae, model.text_encoder))
    text.requires_grad_(False)
    chosen = np.nonzero(np.array([s.style for s in scenes]) == style)[0]
    pictures = images[chosen] if outline_width == OUTLINE_WIDTH else np.stack(
        [render(scenes[i], outline_width) for i in chosen])
    latents = encode_means(vae, pictures) * model.configs["vae"]["scaling_factor"]
    ids = Tokens()(captions([scenes[i] for i in chosen], with_style=False))
    return unet.to(device), text.to(device), latents.to(device), ids.to(device)


def train_lora_stage(out: Path, config: Path, plan: Plan, seed: int, scenes, images, log, device="cpu") -> None:
    from safetensors.torch import save_file

    from edgesd.exporter.toy.lora import train_lora

    unet, text, latents, ids = frozen_base(out, config, scenes, images, "striped", device)
    seed_initialisation(seed, "lora")
    lora = train_lora(unet, text, latents, ids, rank=plan.lora_rank, steps=plan.lora_steps, batch=plan.adapter_batch,
                      lr=plan.lora_lr, generator=stage_generator(seed, "lora"), log=log,
                      max_timestep=plan.lora_max_timestep, text=plan.lora_text)
    rank = str(plan.lora_rank)
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank}
    save_file({k: v.cpu() for k, v in lora.items()}, str(out / ARTEFACTS["lora"]), metadata=metadata)


def train_hypernetwork_stage(out: Path, config: Path, plan: Plan, seed: int, scenes, images, log,
                             device="cpu") -> None:
    from edgesd.exporter.toy.data import Tokens
    from edgesd.exporter.toy.hypernetwork import train_hypernetwork

    unet, text, latents, ids = frozen_base(out, config, scenes, images, "outlined", device, plan.hyper_outline_width)
    seed_initialisation(seed, "hypernetwork")
    train_hypernetwork(unet, text, latents, ids, out / ARTEFACTS["hypernetwork"], steps=plan.hyper_steps,
                       batch=plan.adapter_batch, lr=plan.hyper_lr, generator=stage_generator(seed, "hypernetwork"),
                       log=log, max_timestep=plan.hyper_max_timestep, layer_structure=plan.hyper_layers,
                       drop_caption=plan.hyper_drop_caption, empty_ids=Tokens()([""])[0].to(device))


def run_stage(stage: str, out: Path, config: Path, plan: Plan, seed: int, scenes, images, log, device="cpu"):
    """One stage on the files in `out`, trained on the torch `device`."""
    runs = {"vae": train_vae_stage, "unet": train_unet_stage, "decoder": train_decoder_stage,
            "lora": train_lora_stage, "hypernetwork": train_hypernetwork_stage}
    return runs[stage](out, config, plan, seed, scenes, images, log, device=device)


def train(out: Path, config: Path, plan: Plan, seed: int, stages=STAGES, log=print) -> dict:
    """Run `stages` (in STAGES order) and write training.json; stages not run keep the wall
    times and losses already recorded in `out`."""
    import torch

    from edgesd.exporter.toy.data import scene_pool

    torch.set_num_threads(1)  # on a busy 2-core machine a second thread makes each step ~10x slower
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "training.json"
    report = json.loads(report_path.read_text()) if set(stages) != set(STAGES) and report_path.is_file() else {}
    times, t0 = dict(report.get("wall_seconds", {})), time.time()
    scenes, images = scene_pool(plan.pool, seed)
    times["render"] = time.time() - t0
    losses = report.setdefault("final_losses", {})
    for stage in (s for s in STAGES if s in stages):
        start = time.time()
        result = run_stage(stage, out, config, plan, seed, scenes, images, log)
        if stage == "vae":
            losses["vae"], report["scaling_factor"] = result["loss"], result["scaling_factor"]
        elif result is not None:
            losses[stage] = result
        times[stage] = time.time() - start
    times = {k: v for k, v in times.items() if k in ("render", *STAGES)}  # records of stages since removed go
    times["total"] = sum(times.values())
    versions = report.get("torch", {})
    if isinstance(versions, str):  # written before versions were kept per stage
        versions = {s: versions for s in STAGES if s in times}
    versions = {s: torch.__version__ if s in stages else versions[s] for s in STAGES if s in stages or s in versions}
    report.update(seed=seed, plan=asdict(plan), wall_seconds={k: round(v, 1) for k, v in times.items()},
                  torch=versions, threads=torch.get_num_threads())
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_stages(text: str) -> tuple:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise InvalidArgumentError(f"unknown stage {', '.join(unknown) or repr(text)}; valid: {', '.join(STAGES)}")
    return tuple(n for n in STAGES if n in names)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", type=Path, default=HERE / "models" / "toy")
    p.add_argument("--config", type=Path, default=HERE / "models" / "configs" / "toy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps per stage, to check the script runs")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {', '.join(STAGES)}; later stages train on the checkpoint in -o")
    args = p.parse_args(argv)
    try:
        stages = parse_stages(args.stages)
        if "vae" not in stages and not (args.output / ARTEFACTS["checkpoint"]).is_file():
            raise CheckpointError(f"{args.output / ARTEFACTS['checkpoint']}: no checkpoint to train the later stages "
                                  "on; run the VAE stage first (--stages vae)")
    except (InvalidArgumentError, CheckpointError) as e:
        p.error(str(e))
    report = train(args.output, args.config, QUICK if args.quick else Plan(), args.seed, stages,
                   log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    print(json.dumps(report["wall_seconds"]))


if __name__ == "__main__":
    main()
