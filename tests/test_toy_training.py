"""Loss terms of the toy model's training recipe (torch side; the run itself is not repeated)."""

import pytest

from conftest import requires_exporter

pytestmark = requires_exporter


def test_min_snr_weights_cap_the_signal_to_noise_ratio_at_gamma():
    import torch

    from edgesd.exporter.toy.schedule import alphas_cumprod, min_snr_weights

    a = alphas_cumprod()
    snr = a / (1 - a)
    w = min_snr_weights(a, 5.0)
    assert torch.equal(w[snr <= 5], torch.ones_like(w[snr <= 5]))
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5])
    assert (snr > 5).any() and (snr <= 5).any()  # SD1.5's schedule spans both sides of gamma
    assert torch.equal(min_snr_weights(a, None), torch.ones_like(a))


def test_vae_loss_charges_blurred_edges_more_than_a_uniform_error():
    import torch

    from edgesd.exporter.toy.vae import reconstruction_loss

    x = torch.zeros(1, 3, 16, 16)
    x[..., ::2, :] = 1.0  # one-pixel bands
    blurred = torch.full_like(x, 0.5)  # the bands averaged away: an error of +-0.5 alternating
    offset = x + 0.5  # the same error size everywhere, but sharp
    assert reconstruction_loss(x, x) == 0
    assert reconstruction_loss(blurred, x) > 2 * reconstruction_loss(offset, x)


def test_adapter_loss_can_leave_out_the_top_timesteps():
    import torch

    from edgesd.exporter.toy.schedule import alphas_cumprod, epsilon_loss

    seen = []

    def unet(noisy, t, encoder_hidden_states):
        seen.append(t)
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    generator = torch.Generator().manual_seed(0)
    epsilon_loss(unet, torch.zeros(256, 4, 8, 8), None, generator, alphas_cumprod(), max_timestep=600)
    epsilon_loss(unet, torch.zeros(256, 4, 8, 8), None, generator, alphas_cumprod())
    assert seen[0].max() < 600 and seen[1].max() >= 600


def test_adapter_loss_can_train_on_empty_captions_too():
    """A hypernetwork also changes classifier-free guidance's unconditional context: with
    `drop_caption` that share of its training batches sees the empty prompt."""
    import torch

    from edgesd.exporter.toy.diffusion import adapter_loss

    contexts = []

    def text_encoder(ids):
        contexts.append(ids)
        return (torch.zeros(ids.shape[0], ids.shape[1], 4),)

    def unet(noisy, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    ids, empty = torch.full((64, 5), 7), torch.full((5,), 1)
    for share in (0.0, 0.25):
        adapter_loss(unet, text_encoder, torch.zeros(64, 4, 8, 8), ids, batch=2000, generator=torch.Generator().manual_seed(0),
                     drop_caption=share, empty_ids=empty)(0)
    kept, dropped = ((c == 7).all(1).float().mean().item() for c in contexts)
    assert kept == 1.0 and 0.70 < dropped < 0.80
    assert ((contexts[1] == 7).all(1) | (contexts[1] == 1).all(1)).all()


def test_style_weights_draw_each_style_in_its_share():
    import numpy as np

    from edgesd.exporter.toy.data import scene_pool, style_weights

    scenes, _ = scene_pool(400, 0)  # a quarter outlined
    weights = style_weights(scenes, (0.25, 0.25, 0.5))
    outlined = np.array([s.style == "outlined" for s in scenes])
    assert weights.sum() == pytest.approx(1) and (weights > 0).all()
    assert weights[outlined].sum() == pytest.approx(0.5)
    assert np.ptp(weights[outlined]) == 0  # uniform within a style


def test_stages_are_checked_and_run_in_order():
    from edgesd.errors import InvalidArgumentError
    from edgesd.exporter.toy.train import parse_stages

    assert parse_stages("hypernetwork, lora") == ("lora", "hypernetwork")
    with pytest.raises(InvalidArgumentError, match="valid: vae, unet, decoder, lora, hypernetwork"):
        parse_stages("lora,base")


def test_adapter_stages_need_a_checkpoint(tmp_path, capsys):
    from edgesd.exporter.toy.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--stages", "lora", "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no checkpoint to train the later stages on" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_adapter_stages_retrain_on_the_checkpoint_and_keep_the_base_record(tmp_path):
    import json
    import shutil

    from safetensors import safe_open

    from edgesd.exporter.adapters.hypernetwork import read_hypernetwork
    from edgesd.exporter.toy.train import QUICK, train
    from edgesd.models.families import CONFIG_ROOT
    from edgesd.models.toy.artefacts import ARTEFACTS, artefact_path

    shutil.copy(artefact_path("checkpoint"), tmp_path / ARTEFACTS["checkpoint"])
    (tmp_path / "training.json").write_text(json.dumps({"wall_seconds": {"vae": 10.0, "unet": 20.0, "unet+text": 5.0},
                                                        "final_losses": {"unet": 0.1}}))
    report = train(tmp_path, CONFIG_ROOT / "toy", QUICK, 0, ("lora", "hypernetwork"), log=lambda m: None)
    assert report["final_losses"] == {"unet": 0.1}
    seconds = report["wall_seconds"]
    assert "unet+text" not in seconds  # no longer a stage: its time is not the files'
    assert seconds["vae"] == 10.0 and seconds["total"] == pytest.approx(30 + seconds["render"] + seconds["lora"] + seconds["hypernetwork"], abs=0.2)
    assert report["plan"]["lora_steps"] == QUICK.lora_steps
    assert read_hypernetwork(tmp_path / ARTEFACTS["hypernetwork"]).widths
    with safe_open(str(tmp_path / ARTEFACTS["lora"]), "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())


def test_a_partial_run_writes_the_full_runs_files(tmp_path):
    """Every stage reads only what later stages leave alone, from its own stream: rerunning
    `unet,lora` on a full run's checkpoint gives the same UNet, text encoder and LoRA."""
    import shutil

    from safetensors.torch import load_file

    from edgesd.exporter.toy.train import QUICK, STAGES, train
    from edgesd.models.families import CONFIG_ROOT
    from edgesd.models.toy.artefacts import ARTEFACTS

    config = tmp_path / "config"
    shutil.copytree(CONFIG_ROOT / "toy", config)  # the VAE stage writes its scaling factor there
    full, partial = tmp_path / "full", tmp_path / "partial"
    train(full, config, QUICK, 0, STAGES, log=lambda m: None)
    partial.mkdir()
    shutil.copy(full / ARTEFACTS["checkpoint"], partial / ARTEFACTS["checkpoint"])
    train(partial, config, QUICK, 0, ("unet", "lora"), log=lambda m: None)
    for name in ("checkpoint", "lora"):
        a, b = load_file(full / ARTEFACTS[name]), load_file(partial / ARTEFACTS[name])
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), name
    before = load_file(tmp_path / "full" / ARTEFACTS["checkpoint"])
    assert any(k.startswith("model.diffusion_model.") for k in before)


def test_a_distilled_toy_taesd_is_what_tiny_vae_reads(tmp_path):
    """exporter/toy/taesd.py writes an AutoencoderTiny folder that `--tiny-vae` accepts for the
    toy model (4 latent channels, 8x upsampling like its VAE) and that decodes towards the VAE."""
    import torch

    from edgesd.exporter.tiny_vae import load_tiny_vae
    from edgesd.exporter.toy.data import scene_pool
    from edgesd.exporter.toy.folders import config_dir
    from edgesd.exporter.toy.taesd import distil_taesd
    from edgesd.exporter.toy.vae import committed_vae
    from edgesd.models.families import FAMILIES, load_configs

    _, images = scene_pool(8, 0)
    configs = load_configs(config_dir())
    losses = []
    distil_taesd(committed_vae(), configs["vae"]["scaling_factor"], images, tmp_path / "taesd", steps=30, batch=4,
                 log=losses.append)
    tiny, config, record = load_tiny_vae(tmp_path / "taesd", FAMILIES["sd1"], configs)
    assert record["format"] == "diffusers" and record["latent_channels"] == 4
    out = tiny.decode(torch.zeros(1, 4, 8, 8)).sample
    assert out.shape == (1, 3, 64, 64)
    first, last = (float(m.split("loss ")[1].split()[0]) for m in (losses[0], losses[-1]))
    assert last < first  # it learns
