"""How the toy evaluator reads the renderer's scenes, clean and after a round trip through the
committed VAE (encode, decode: what any generated image is limited to), per style; and, with
--generations, how often it sees stripes or outlines in the plain model's own images.

    python benchmarks/toy_evaluator.py                  # 150 scenes per style, seed 7
    python benchmarks/toy_evaluator.py -n 300 --generations
    python benchmarks/toy_evaluator.py -n 600 --by-combination   # where the decoder loses a style
"""

import argparse

import numpy as np

from edgesd.models.toy import STYLES, evaluate, random_scene, render
from edgesd.models.toy.scenes import BACKGROUNDS, COLOURS


def scenes_of(style: str, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, style) for _ in range(n)]


def readings(images, scenes) -> dict:
    """Fractions: shape, colour and background all right; each style verdict."""
    verdicts = [evaluate(im) for im in images]
    row = {"shape+colour+background": np.mean([(v.shape, v.colour, v.background) == (s.shape, s.colour, s.background)
                                               for v, s in zip(verdicts, scenes)])}
    row.update({f"read {style}": np.mean([v.style() == style for v in verdicts]) for style in STYLES})
    return {k: float(v) for k, v in row.items()}


def round_trips(n: int, seed: int) -> dict:
    """style -> (scenes, their renders, the renders after a round trip through the committed VAE)."""
    from edgesd.exporter.toy.vae import committed_vae, round_trip

    vae, trips = committed_vae(), {}
    for style in STYLES:
        scenes = scenes_of(style, n, seed)
        clean = np.stack([render(s) for s in scenes])
        trips[style] = scenes, clean, round_trip(vae, clean)
    return trips


def domain_table(trips: dict) -> dict:
    """(style, "clean" | "decoded") -> readings."""
    table = {}
    for style, (scenes, clean, decoded) in trips.items():
        table[style, "clean"] = readings(clean, scenes)
        table[style, "decoded"] = readings(decoded, scenes)
    return table


def survival_by_combination(trips: dict) -> dict:
    """(style, colour, background) -> fraction of the style's decoded scenes still read as that
    style: a decoder may keep stripes for one colour on a background and lose them for the next."""
    kept = {}
    for style in STYLES[1:]:
        scenes, _, decoded = trips[style]
        for scene, image in zip(scenes, decoded):
            kept.setdefault((style, scene.colour, scene.background), []).append(evaluate(image).style() == style)
    return {key: float(np.mean(hits)) for key, hits in kept.items()}


def print_survival(survival: dict) -> None:
    backgrounds = list(BACKGROUNDS)
    for style in STYLES[1:]:
        print(f"\n| {style}: kept after a round trip | " + " | ".join(backgrounds) + " |")
        print("|---|" + "---|" * len(backgrounds))
        for colour in COLOURS:
            cells = [survival.get((style, colour, b)) for b in backgrounds]
            print(f"| {colour} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")


def generation_rates() -> dict:
    """Stripes and outlines the evaluator sees in the plain model's images (no adapter asks for them)."""
    from edgesd.exporter.toy.folders import export_variant
    from edgesd.runtime.cli import cache_dir
    from edgesd.runtime.pipeline import Pipeline
    from edgesd.runtime.toy_eval import generate, grid_prompts, scores

    pipe = Pipeline.from_pretrained(export_variant(cache_dir() / "demo", "base"), provider="cpu")
    prompts, truths = grid_prompts()
    rates = {}
    for sampler, schedule in (("Euler a", "Automatic"), ("DPM++ 2M", "Karras")):
        result = scores(generate(pipe, prompts, sampler=sampler, steps=20, schedule=schedule), truths)
        rates[sampler] = {k: result[k] for k in ("stripes", "outline")}
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=150, help="scenes per style")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--generations", action="store_true", help="also the plain model's 80 prompts, 20 steps")
    ap.add_argument("--by-combination", action="store_true",
                    help="also striped and outlined survival per colour and background")
    args = ap.parse_args(argv)
    trips = round_trips(args.n, args.seed)
    table = domain_table(trips)
    columns = list(next(iter(table.values())))
    print("| scenes | domain | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for (style, domain), row in table.items():
        print(f"| {style} | {domain} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    if args.by_combination:
        print_survival(survival_by_combination(trips))
    if args.generations:
        for sampler, rates in generation_rates().items():
            print(f"plain model, {sampler}: stripes {rates['stripes']:.3f}, outline {rates['outline']:.3f}")


if __name__ == "__main__":
    main()
