"""Where DeepCache cuts a UNet: the shallow branch that runs at every step, and the deep feature it reuses.

DeepCache (Ma et al. 2023) observes that a UNet's high-level features change little between
neighbouring denoising steps. At a "full" step the whole UNet runs and the hidden state entering
one of the last up layers is kept; at the next steps only the shallow branch runs: conv_in, the
first down stages, and the up layers that consume their skip connections, fed the kept feature in
place of everything deeper.

The UNet is read as a ladder. Down stages, in order: every resnet(+attention) layer of every down
block, and each block's downsampler; each stage's output is a skip connection (conv_in gives one
more, first). Up layers, in order: every resnet(+attention) layer of every up block; each consumes
one skip, the last layer the first skip. `branch` b (DeepCache's numbering: 0 is the shallowest)
means the shallow pass computes conv_in and down stages 0..b, i.e. b + 2 skips, and the last b + 2
up layers; the feature cached is the hidden state entering the first of those up layers.

Pure Python over the diffusers UNet config, so exporter and runtime size the graphs alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesd.errors import InvalidArgumentError

DEFAULT_BRANCH = 0  # DeepCache's default: the shallowest cut, the largest saving


@dataclass(frozen=True)
class Cut:
    """The cut of one UNet at one branch."""

    branch: int
    up_block: int  # up block of the first up layer the shallow pass runs
    up_layer: int  # its index within that block
    channels: int  # channels of the cached feature
    scale: int  # the feature's downsampling relative to the latent (spatial size = ceil(latent / scale))
    down_stages: int  # down stages the shallow pass runs (after conv_in): branch + 1

    def manifest_entry(self) -> dict:
        """The manifest's `deepcache` record: the branch, and where that cuts, in diffusers' module names."""
        return {"branch": self.branch, "feature": f"input of up_blocks.{self.up_block} layer {self.up_layer}",
                "feature_channels": self.channels, "feature_scale": self.scale}


def layers_per_block(unet_config: dict) -> list:
    """Resnet layers of each down block (an int in most configs, a list in some)."""
    layers = unet_config.get("layers_per_block", 2)
    blocks = len(unet_config["block_out_channels"])
    return list(layers) if isinstance(layers, (list, tuple)) else [int(layers)] * blocks


def down_stage_count(unet_config: dict) -> int:
    """Down stages after conv_in: every layer, plus a downsampler in every down block but the last."""
    layers = layers_per_block(unet_config)
    return sum(layers) + len(layers) - 1


def up_layers(unet_config: dict) -> list:
    """(up block, layer) of every up layer, in order: up block i has one layer more than the down
    block it mirrors (that one also consumes the downsampler's or conv_in's skip)."""
    reversed_layers = layers_per_block(unet_config)[::-1]
    return [(block, layer) for block, count in enumerate(reversed_layers) for layer in range(count + 1)]


def branches(unet_config: dict) -> range:
    """The valid branches: the shallowest (0) to the deepest, which reuses only the mid block's output."""
    return range(down_stage_count(unet_config))


def cut(unet_config: dict, branch: int) -> Cut:
    """The cut at `branch`; an InvalidArgumentError naming the valid range for any other value."""
    valid = branches(unet_config)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch not in valid:
        raise InvalidArgumentError(f"deepcache branch must be an integer from {valid.start} to {valid.stop - 1} "
                                   f"for this UNet, got {branch!r}")
    ladder = up_layers(unet_config)
    block, layer = ladder[len(ladder) - (branch + 2)]
    channels = list(unet_config["block_out_channels"])[::-1]
    entering = channels[block] if layer > 0 or block == 0 else channels[block - 1]
    return Cut(branch=branch, up_block=block, up_layer=layer, channels=entering,
               scale=2 ** (len(channels) - 1 - block), down_stages=branch + 1)


def feature_size(size: int, scale: int) -> int:
    """The cached feature's spatial size for a latent side of `size`: each stride-2 downsampler
    (3x3, padding 1) rounds up."""
    while scale > 1:
        size, scale = (size + 1) // 2, scale // 2
    return size
