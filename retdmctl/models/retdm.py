"""The RETDM networks (DESIGN.md section 2).

phi (image net) = backbone -> ``embed`` (Linear to D = 512, ReLU, dropout). For VGG-16 the
backbone ends at fc6 and ``embed`` is the paper's fc7 cut to 512 units.
psi (label net) = two fully-connected layers of D units.
Classification head W_c on f; reconstruction head W_r on g.

In frozen-backbone mode ``backbone`` is None and the model consumes cached backbone
features instead of pixels; everything else is identical.
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
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.label_net = LabelNet(num_classes, embed_dim)
        self.cls_head = nn.Linear(embed_dim, num_classes)
        self.rec_head = nn.Linear(embed_dim, num_classes)

    # Parameter groups, by the stage that trains them.
    def image_parameters(self) -> list[nn.Parameter]:
        """phi and W_c: what the classifier stage trains."""
        mods = [self.embed, self.cls_head] + ([self.backbone] if self.backbone is not None else [])
        return [p for m in mods for p in m.parameters()]

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

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """f = phi(x); ``x`` is pixels, or backbone features when there is no backbone."""
        if self.backbone is not None:
            x = self.backbone(x)
        return self.embed(x)

    def embed_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f before dropout, f after dropout): the metric loss and the feature bank use
        the first (what the bank was initialised with, in eval mode), the classifier head
        the second. In eval mode both are the same."""
        if self.backbone is not None:
            x = self.backbone(x)
        linear, relu, dropout = self.embed
        clean = relu(linear(x))
        return clean, dropout(clean)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.cls_head(f)  # logits; p = sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed_images(x))

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone (what a checkpoint of a frozen run holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
