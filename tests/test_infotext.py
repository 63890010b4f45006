"""Infotext: A1111-format samples parse as A1111's parse_generation_parameters reads them,
and an image's own infotext regenerates it bit for bit (np.array_equal), from Python and
through `edgesd generate --from-png`."""

import numpy as np
import pytest

from edgesd.errors import InvalidArgumentError
from edgesd.runtime.infotext import call_arguments, create_infotext, parse_infotext

SAMPLES = [
    # 1. plain txt2img, current A1111 (Schedule type present)
    ("masterpiece, a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
     "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.9.3",
     {"Prompt": "masterpiece, a cat", "Negative prompt": "blurry", "Steps": "20", "Sampler": "DPM++ 2M",
      "Schedule type": "Karras", "CFG scale": "7", "Seed": "1234", "Size-1": "512", "Size-2": "768",
      "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.9.3", "Clip skip": "1",
      "RNG": "GPU"}),
    # 2. old combined label, no Schedule type
    ("a dog\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 42, Size: 512x512",
     {"Prompt": "a dog", "Negative prompt": "", "Sampler": "DPM++ 2M", "Schedule type": "Karras",
      "CFG scale": "5.5"}),
    # 3. old label with a two-word schedule-less sampler and Exponential
    ("x\nSteps: 25, Sampler: DPM++ 3M SDE Exponential, CFG scale: 4, Seed: 1, Size: 64x64",
     {"Sampler": "DPM++ 3M SDE", "Schedule type": "Exponential"}),
    # 4. ancestral sampler stays whole ("Euler a" is a sampler, not Euler + "a")
    ("x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, ENSD: 31337",
     {"Sampler": "Euler a", "Schedule type": "Automatic", "ENSD": "31337"}),
    # 5. quoted values with commas, colons and escaped quotes
    ('x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model: "my, model: v2", '
     'Lora hashes: "add_detail: 7c6bad76eb54, more \\"x\\": 1"',
     {"Model": "my, model: v2", "Lora hashes": 'add_detail: 7c6bad76eb54, more "x": 1'}),
    # 6. multi-line prompt and multi-line negative prompt
    ("line one\nline two\nNegative prompt: bad\nworse\nSteps: 10, Sampler: Heun, CFG scale: 3, Seed: 2, Size: 64x64",
     {"Prompt": "line one\nline two", "Negative prompt": "bad\nworse", "Sampler": "Heun"}),
    # 7. a last line with fewer than 3 pairs is prompt text, not parameters
    ("a photo\nstyle: oil, mood: calm", {"Prompt": "a photo\nstyle: oil, mood: calm", "Negative prompt": "",
                                         "Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU"}),
    # 8. variation seed, clip skip, RNG and denoising strength (img2img)
    ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 10, Size: 512x512, Variation seed: 99, "
     "Variation seed strength: 0.25, Denoising strength: 0.6, Clip skip: 2, RNG: CPU, Mask blur: 4",
     {"Variation seed": "99", "Variation seed strength": "0.25", "Denoising strength": "0.6", "Clip skip": "2",
      "RNG": "CPU", "Mask blur": "4"}),
    # 9. hires fix fields and their sizes
    ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 512x512, Denoising strength: 0.7, "
     "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent",
     {"Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent"}),
    # 10. 64-bit seed and a Seed resize from size
    ("x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 18446744073709551615, Size: 64x64, "
     "Seed resize from: 512x512", {"Seed": "18446744073709551615", "Seed resize from-1": "512",
                                    "Seed resize from-2": "512"}),
    # 11. negative prompt only, empty prompt; whitespace around lines is stripped
    ("  \nNegative prompt:   ugly  \nSteps: 20, Sampler: LMS, CFG scale: 7, Seed: 1, Size: 64x64",
     {"Prompt": "", "Negative prompt": "ugly", "Sampler": "LMS"}),
    # 12. A1111's new-style schedule label next to the sampler, with an unknown extra field kept
    ("x\nSteps: 8, Sampler: DPM++ SDE, Schedule type: Align Your Steps, CFG scale: 2, Seed: 1, Size: 64x64, "
     "Emphasis: Original, TI hashes: \"emb: 1234\"", {"Schedule type": "Align Your Steps", "Emphasis": "Original",
                                                      "TI hashes": "emb: 1234"}),
]


@pytest.mark.parametrize("text,expected", SAMPLES, ids=[f"sample{i + 1}" for i in range(len(SAMPLES))])
def test_a1111_samples_parse(text, expected):
    parsed = parse_infotext(text)
    for key, value in expected.items():
        assert parsed[key] == value, key


def test_call_arguments_convert_and_map_names():
    kwargs = call_arguments(parse_infotext(SAMPLES[7][0]))
    assert kwargs == {"prompt": "x", "negative_prompt": "", "rng": "cpu", "sampler": "Euler",
                      "schedule": "Automatic", "num_inference_steps": 20, "guidance_scale": 7.0, "seed": 10,
                      "width": 512, "height": 512, "subseed": 99, "subseed_strength": 0.25, "strength": 0.6,
                      "mask_blur": 4.0, "clip_skip": 2}
    assert call_arguments(parse_infotext(SAMPLES[11][0]))["emphasis"] == "Original"
    assert call_arguments(parse_infotext(SAMPLES[9][0]))["seed"] == 2**64 - 1  # exact, no float rounding
    assert call_arguments(parse_infotext(SAMPLES[0][0]))["rng"] == "nv"  # GPU noise = the NV source


def test_hires_fields_map_to_hires_arguments():
    """With hires fields, Denoising strength is the second pass's, not an img2img strength."""
    kwargs = call_arguments(parse_infotext(SAMPLES[8][0]))
    assert (kwargs["enable_hr"], kwargs["hr_scale"], kwargs["hr_second_pass_steps"], kwargs["hr_upscaler"]) == (
        True, 2.0, 10, "Latent")
    assert "strength" not in kwargs


def test_unknown_rng_is_refused():
    with pytest.raises(InvalidArgumentError, match="RNG"):
        call_arguments(parse_infotext("x\nSteps: 20, Sampler: Euler, Seed: 1, RNG: Quantum"))


def test_written_text_parses_back_to_the_same_fields():
    params = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 7,
              "Size": "64x128", "Model": "a, b: c", "ENSD": 31337, "RNG": "NV", "Version": "edgesd"}
    text = create_infotext("a cat, \"quoted\"\nsecond line", "neg: one", params)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a cat, \"quoted\"\nsecond line" and parsed["Negative prompt"] == "neg: one"
    assert parsed["Model"] == "a, b: c" and parsed["Size-1"] == "64" and parsed["Size-2"] == "128"
    assert parsed["Sampler"] == "Euler a" and parsed["Schedule type"] == "Karras" and parsed["RNG"] == "NV"


@pytest.fixture(scope="module")
def runtime(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


CASES = [
    dict(sampler="Euler a", schedule="Karras", seed=77, ensd=31337, negative_prompt="blurry, dark"),
    dict(sampler="DPM++ 2M", seed=5, subseed=9, subseed_strength=0.4, rng="nv", guidance_scale=4.5),
    dict(sampler="DPM++ SDE", seed=2**40 + 3, height=64, width=128),
    dict(sampler="Euler", seed=8, clip_skip=2, emphasis="No norm"),
]


@pytest.mark.parametrize("kwargs", CASES, ids=["ancestral-ensd", "variation-nv", "sde-wide", "clip-skip-emphasis"])
def test_infotext_regenerates_the_identical_image(runtime, kwargs):
    first = runtime("a (red:1.3) circle, \"quoted\": yes", num_inference_steps=4, output_type="np", **kwargs)
    again = runtime(**runtime.infotext_params(first.infotext), output_type="np")
    assert np.array_equal(first.images, again.images)
    assert again.infotext == first.infotext


def test_cli_from_png_regenerates_the_identical_image(tiny_export, tmp_path):
    from PIL import Image

    from edgesd.runtime.cli import main

    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["generate", str(tiny_export), "a blue square", "-n", "noise", "--steps", "3", "--seed", "11",
                 "--sampler", "Euler a", "--ensd", "5", "--cfg", "6", "-o", str(a)]) == 0
    assert main(["generate", str(tiny_export), "--from-png", str(a), "-o", str(b)]) == 0
    assert main(["generate", str(tiny_export), "--from-png", str(a), "--seed", "12", "-o", str(c)]) == 0
    ia, ib, ic = (Image.open(p) for p in (a, b, c))
    assert np.array_equal(np.asarray(ia), np.asarray(ib)) and ia.info["parameters"] == ib.info["parameters"]
    assert "Seed: 12" in ic.info["parameters"] and not np.array_equal(np.asarray(ia), np.asarray(ic))


def test_cli_from_png_errors_are_one_line(tiny_export, tmp_path, capsys):
    from PIL import Image

    from edgesd.runtime.cli import main

    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    assert main(["generate", str(tiny_export), "--from-png", str(bare), "-o", str(tmp_path / "o.png")]) == 2
    assert "no 'parameters' text" in capsys.readouterr().err
    assert main(["generate", str(tiny_export), "-o", str(tmp_path / "o.png")]) == 2
    assert "a prompt is needed" in capsys.readouterr().err
