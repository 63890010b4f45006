"""A seeded optimisation loop with warmup + cosine learning rate and progress logging."""

from __future__ import annotations

import math
import time


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def optimise(params, loss_of_step, *, steps: int, lr: float, log, name: str, warmup: int = 100, ema=None):
    """Run `steps` AdamW steps of `loss_of_step(step)`; `ema` (optional) is called after each."""
    import torch

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    start, running = time.time(), None
    for step in range(steps):
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {running:.5f} ({time.time() - start:.0f} s)")
    return running


class Ema:
    """Exponential moving average of a module's parameters (copied back with `apply`)."""

    def __init__(self, module, decay: float):
        self.module, self.decay = module, decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    def __call__(self):
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.module.parameters()], 1 - self.decay)

    def apply(self):
        import torch

        with torch.no_grad():
            for p, s in zip(self.module.parameters(), self.shadow):
                p.copy_(s)
