"""The RETDM networks (docs/method.md).

phi (image net) = backbone -> ``embed`` (Linear to D = 512, ReLU, dropout). For VGG-16 the
backbone ends at fc6 and ``embed`` is the paper's fc7 cut to 512 units.
psi (label net) = two fully-connected layers of D units.
Classification head W_c on f; reconstruction head W_r on g.

In frozen-backbone mode ``backbone`` is None and the model consumes cached backbone
features instead of pixels; everything else is identical. With ``tune_blocks`` = N > 0
(the middle way) the model holds the whole backbone but consumes cached activations of
its trunk and runs (and trains) only its last N blocks and head.
"""

from __future__ import annotations

import torch
from torch import nn


class LabelNet(nn.Module):
    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_classes, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(y)))


class RETDM(nn.Module):
    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        embed_dim: int = 512,
        dropout: float = 0.2,
        backbone: nn.Module | None = None,
        tune_blocks: int = 0,
    ) -> None:
        super().__init__()
        if tune_blocks and backbone is None:
            raise ValueError("tune_blocks needs the backbone")
        self.backbone = backbone
        self.tune_blocks = tune_blocks  # > 0: inputs are trunk activations, not pixels
        self.embed = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.label_net = LabelNet(num_classes, embed_dim)
        self.cls_head = nn.Linear(embed_dim, num_classes)
        self.rec_head = nn.Linear(embed_dim, num_classes)

    # Parameter groups, by the stage that trains them.
    def image_parameters(self) -> list[nn.Parameter]:
        """phi and W_c: what the classifier stage trains."""
        mods = [self.embed, self.cls_head]
        if self.tune_blocks:
            mods += self.backbone.tail_modules(self.tune_blocks)
        elif self.backbone is not None:
            mods.append(self.backbone)
        return [p for m in mods for p in m.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the joint stage trains (the frozen trunk left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, params: list[nn.Parameter], backbone_lr_mult: float) -> list[dict]:
        """``params`` as optimizer groups: the backbone's at ``backbone_lr_mult`` x lr."""
        in_backbone = {id(p) for p in self.backbone.parameters()} if self.backbone is not None else set()
        groups = [
            {"params": [p for p in params if id(p) not in in_backbone], "lr_mult": 1.0},
            {"params": [p for p in params if id(p) in in_backbone], "lr_mult": backbone_lr_mult},
        ]
        return [g for g in groups if g["params"]]

    def label_parameters(self) -> list[nn.Parameter]:
        """psi and W_r: what the metric stage trains."""
        return [*self.label_net.parameters(), *self.rec_head.parameters()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features of ``x``: pixels, trunk activations
        (``tune_blocks`` > 0), or the features themselves (no backbone)."""
        if self.tune_blocks:
            return self.backbone.forward_tail(x, self.tune_blocks)
        if self.backbone is not None:
            return self.backbone(x)
        return x

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """f = phi(x); ``x`` is what :meth:`features` takes."""
        return self.embed(self.features(x))

    def embed_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f before dropout, f after dropout): the metric loss and the feature bank use
        the first (what the bank was initialised with, in eval mode), the classifier head
        the second. In eval mode both are the same."""
        linear, relu, dropout = self.embed
        clean = relu(linear(self.features(x)))
        return clean, dropout(clean)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.cls_head(f)  # logits; p = sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed_images(x))

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone (what a checkpoint of a frozen run holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
