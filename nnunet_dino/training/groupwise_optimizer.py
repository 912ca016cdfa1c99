"""One optimizer object made of several torch optimizers, each owning some parameter groups.

GuiDINO trains nnU-Net's network with nnU-Net's SGD recipe, but its guidance modules (TokenBook, gates) and LoRA
adapters with AdamW: SGD with momentum 0.99 at 1e-2 made the TokenBook oscillate and fail a two-appearance class
that Adam learns (docs/guidino.md, "Optimisation"). nnU-Net's train_step, GradScaler, gradient clipping,
checkpointing and ``--c`` all talk to one ``trainer.optimizer``; this class is that one object:

- ``param_groups`` is the concatenation of the children's group dicts (the *same* dict objects), so schedulers
  and GradScaler's unscale/inf checks see and set every group;
- ``step``/``zero_grad`` run every child; ``state_dict``/``load_state_dict`` hold each child's own state, so a
  resumed run continues every optimizer exactly.
"""
from __future__ import annotations

import torch


class GroupwiseOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("GroupwiseOptimizer needs at least one optimizer.")
        self.optimizers = list(optimizers)
        groups = [g for o in self.optimizers for g in o.param_groups]
        # torch.optim.Optimizer.__init__ appends these very dicts (it fills in defaults, which are empty here),
        # so a learning rate written through this object is the one the owning child reads.
        super().__init__(groups, defaults={})
        shared = [id(g) for g in self.param_groups] == [id(g) for g in groups]
        assert shared, "param groups must be shared with the child optimizers"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "types": [type(o).__name__ for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        types = [type(o).__name__ for o in self.optimizers]
        if state_dict.get("types") != types:
            saved = state_dict.get("types", "a single optimizer")
            raise ValueError(f"The checkpoint's optimizer state is for {saved}, this trainer uses {types}. Resume "
                             f"with the trainer that wrote the checkpoint.")
        for optimizer, child_state in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(child_state)
        # torch's load_state_dict gives each child new group dicts: share those again.
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def __repr__(self) -> str:
        return "GroupwiseOptimizer(\n" + "\n".join(f"  {o!r}" for o in self.optimizers) + "\n)"
