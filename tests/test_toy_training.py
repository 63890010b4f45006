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


def test_offset_noise_shifts_each_channel_by_a_constant():
    import torch

    from edgesd.exporter.toy.schedule import alphas_cumprod, epsilon_loss

    seen = {}

    def unet(noisy, t, encoder_hidden_states):
        seen["noisy"], seen["t"] = noisy, t
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    table = alphas_cumprod()
    latents = torch.zeros(64, 4, 8, 8)
    plain = epsilon_loss(unet, latents, None, torch.Generator().manual_seed(0), table)
    plain_means = (seen["noisy"] / (1 - table[seen["t"]]).sqrt().view(-1, 1, 1, 1)).mean(dim=(2, 3))
    shifted = epsilon_loss(unet, latents, None, torch.Generator().manual_seed(0), table, offset=1.0)
    shifted_means = (seen["noisy"] / (1 - table[seen["t"]]).sqrt().view(-1, 1, 1, 1)).mean(dim=(2, 3))
    # pure noise over 64 pixels: channel means of std 1/8; with offset 1 about sqrt(1 + 1/64)
    assert plain_means.std() == pytest.approx(1 / 8, rel=0.25)
    assert shifted_means.std() == pytest.approx(1.0, rel=0.25)
    assert shifted > plain  # a zero prediction misses the offset too


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


def test_stages_are_checked_and_run_in_order():
    from edgesd.errors import InvalidArgumentError
    from edgesd.exporter.toy.train import parse_stages

    assert parse_stages("hypernetwork, lora") == ("lora", "hypernetwork")
    with pytest.raises(InvalidArgumentError, match="valid: base, decoder, lora, hypernetwork"):
        parse_stages("lora,vae")


def test_adapter_stages_need_a_checkpoint(tmp_path, capsys):
    from edgesd.exporter.toy.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--stages", "lora", "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no checkpoint to train the decoder or adapters on" in capsys.readouterr().err
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
    (tmp_path / "training.json").write_text(json.dumps({"wall_seconds": {"vae": 10.0, "unet+text": 20.0},
                                                        "final_losses": {"unet": 0.1}}))
    report = train(tmp_path, CONFIG_ROOT / "toy", QUICK, 0, ("lora", "hypernetwork"), log=lambda m: None)
    assert report["final_losses"] == {"unet": 0.1}
    seconds = report["wall_seconds"]
    assert seconds["vae"] == 10.0 and seconds["total"] == pytest.approx(30 + seconds["lora"] + seconds["hypernetwork"], abs=0.2)
    assert report["plan"]["lora_steps"] == QUICK.lora_steps
    assert read_hypernetwork(tmp_path / ARTEFACTS["hypernetwork"]).widths
    with safe_open(str(tmp_path / ARTEFACTS["lora"]), "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
