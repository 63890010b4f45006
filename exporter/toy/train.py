"""Train the toy model and its adapters, and write the committed artefacts.

    python -m edgesd.exporter.toy.train            # full run (about 31 min on one quiet CPU core)
    python -m edgesd.exporter.toy.train --quick -o /tmp/toy --config /tmp/toy-config

Stages, all seeded (same seed, same machine, same files): VAE; UNet + text encoder; a
kohya LoRA that adds stripes; an A1111 hypernetwork that outlines. Writes the LDM single
file (fp16), the LoRA, the hypernetwork and `training.json` (steps, losses, wall times)
into the output folder, and the measured latent scaling factor into the config's VAE.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgesd.models.toy.artefacts import ARTEFACTS

HERE = Path(__file__).resolve().parents[2]


@dataclass
class Plan:
    pool: int = 12000
    vae_steps: int = 5000
    vae_batch: int = 16
    unet_steps: int = 3000
    unet_batch: int = 32
    lora_steps: int = 450
    hyper_steps: int = 450
    adapter_batch: int = 16
    adapter_lr: float = 3e-3


QUICK = Plan(pool=200, vae_steps=5, unet_steps=5, lora_steps=3, hyper_steps=3)


def build(configs: dict):
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


def train(out: Path, config: Path, plan: Plan, seed: int, log=print) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from edgesd.exporter.toy.data import Tokens, captions, scene_pool
    from edgesd.exporter.toy.diffusion import train_diffusion
    from edgesd.exporter.toy.hypernetwork import train_hypernetwork
    from edgesd.exporter.toy.lora import train_lora
    from edgesd.exporter.toy.vae import encode_means, train_vae
    from edgesd.models.families import load_configs

    torch.set_num_threads(1)  # on a busy 2-core machine a second thread makes each step ~10x slower
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    configs = load_configs(config)
    times, losses, t0 = {}, {}, time.time()

    scenes, images = scene_pool(plan.pool, seed)
    times["render"] = time.time() - t0
    vae, unet, text = build(configs)
    losses["vae"] = train_vae(vae, images, steps=plan.vae_steps, batch=plan.vae_batch, lr=2e-3,
                              generator=generator, log=log)
    times["vae"] = time.time() - t0 - sum(times.values())

    means = encode_means(vae, images)
    scale = float(1 / means.std())
    vae_config_path = config / "vae" / "config.json"
    vae_config = json.loads(vae_config_path.read_text())
    vae_config_path.write_text(json.dumps(dict(vae_config, scaling_factor=round(scale, 5)), indent=2) + "\n")
    configs["vae"]["scaling_factor"] = round(scale, 5)
    latents = means * round(scale, 5)
    tokens = Tokens()
    ids, empty = tokens(captions(scenes)), tokens([""])[0]
    losses["unet"] = train_diffusion(unet, text, latents, ids, empty, steps=plan.unet_steps, batch=plan.unet_batch,
                                     lr=2e-3, generator=generator, log=log)
    save_checkpoint(configs, unet, vae, text, out / ARTEFACTS["checkpoint"], seed)
    times["unet+text"] = time.time() - t0 - sum(times.values())

    plain_ids = tokens(captions(scenes, with_style=False))
    styles = np.array([s.style for s in scenes])
    text.requires_grad_(False)
    striped = torch.from_numpy(np.nonzero(styles == "striped")[0])
    lora = train_lora(copy.deepcopy(unet), text, latents[striped], plain_ids[striped], steps=plan.lora_steps,
                      batch=plan.adapter_batch, lr=plan.adapter_lr, generator=generator, log=log)
    save_file(lora, str(out / ARTEFACTS["lora"]), metadata={"format": "pt", "ss_network_module": "networks.lora",
                                                            "ss_network_dim": "4", "ss_network_alpha": "4"})
    times["lora"] = time.time() - t0 - sum(times.values())

    outlined = torch.from_numpy(np.nonzero(styles == "outlined")[0])
    train_hypernetwork(copy.deepcopy(unet), text, latents[outlined], plain_ids[outlined],
                       out / ARTEFACTS["hypernetwork"], steps=plan.hyper_steps, batch=plan.adapter_batch, lr=plan.adapter_lr,
                       generator=generator, log=log)
    times["hypernetwork"] = time.time() - t0 - sum(times.values())
    times["total"] = time.time() - t0
    report = {"seed": seed, "plan": asdict(plan), "scaling_factor": round(scale, 5),
              "final_losses": losses, "wall_seconds": {k: round(v, 1) for k, v in times.items()},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", type=Path, default=HERE / "models" / "toy")
    p.add_argument("--config", type=Path, default=HERE / "models" / "configs" / "toy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps per stage, to check the script runs")
    args = p.parse_args(argv)
    report = train(args.output, args.config, QUICK if args.quick else Plan(), args.seed,
                   log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    print(json.dumps(report["wall_seconds"]))


if __name__ == "__main__":
    main()
