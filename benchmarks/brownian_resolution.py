"""How fine the SDE samplers' Brownian tree must be: convergence as the step count grows.

On the exact Gaussian test problem, DPM++ 2M SDE (or another SDE sampler) runs at 10 ... 160
steps and at 320, each on Brownian trees of one resolution (`tol`, relative width of a leaf);
the RMS distance of each result from the 320-step one should keep falling as the steps grow.
A tree that is too coarse stops converging: below its leaves, points are bridged between the
ones drawn before, so two step counts see different fine detail.

    python benchmarks/brownian_resolution.py
    python benchmarks/brownian_resolution.py --sampler "DPM++ 3M SDE" --tols 0.001 0.03 0.1
"""

import argparse
import math

import numpy as np

from edgesd import schedulers as S
from edgesd.schedulers.testing import gaussian_denoiser

MEAN = np.array([0.3, -0.5, 0.1, 0.8]).reshape(4, 1, 1)
STD = np.array([0.5, 1.0, 0.7, 0.2]).reshape(4, 1, 1)


def run(sampler, steps, tol, shape=(2, 4, 32, 32), seeds=(3, 4)):
    sigmas = S.sigmas_for(sampler, "Automatic", steps, S.sigma_table())
    positive = sigmas[sigmas > 0]
    trees = [S.BrownianTree(shape[1:], positive.min(), positive.max(), seed, tol=tol) for seed in seeds]

    def noise(sigma, sigma_next):  # k-diffusion's BrownianTreeNoiseSampler, one tree per image
        scale = 1 / math.sqrt(abs(sigma_next - sigma))
        return np.stack([(t(sigma_next) - t(sigma)) * scale for t in trees]).astype(np.float32)

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * np.float32(sigmas[0])
    return S.sample(sampler, gaussian_denoiser(MEAN, STD), x, sigmas, noise=noise)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sampler", default="DPM++ 2M SDE")
    ap.add_argument("--tols", type=float, nargs="+", default=[0.001, 0.03, 0.1, 0.25, 0.5])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    args = ap.parse_args(argv)
    print(f"{args.sampler}: RMS distance from the 320-step result at " + " / ".join(map(str, args.steps)) + " steps")
    for tol in args.tols:
        reference = run(args.sampler, 320, tol)
        rms = [float(np.sqrt(np.mean((run(args.sampler, n, tol) - reference) ** 2))) for n in args.steps]
        print(f"tol {tol:g}: " + " / ".join(f"{r:.3f}" for r in rms), flush=True)


if __name__ == "__main__":
    main()
