"""The toy text-to-image model: procedural scenes, their prompts, an evaluator, and the
trained artefacts (LDM checkpoint, kohya LoRA, A1111 hypernetwork). numpy only."""

from edgesd.models.toy.scenes import (BACKGROUNDS, COLOURS, SHAPES, STYLES, Scene, combinations, prompt_of,
                                      random_scene, render)
from edgesd.models.toy.evaluate import Verdict, evaluate
from edgesd.models.toy.artefacts import ARTEFACTS, artefact_path

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "STYLES", "Scene", "combinations", "prompt_of", "random_scene",
           "render", "Verdict", "evaluate", "ARTEFACTS", "artefact_path"]
