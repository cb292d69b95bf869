"""Active-set prediction at run time, from the predictor tensors stored in the layout file.

Scores are sigmoid(W2 · relu(W1 · x + b1) + b2) with W2/b2 rows in stored neuron order, so the
predicted ids are stored positions directly. Strategies: ``topk`` (the layer's k per token),
``threshold`` (logit above the layer's cut), ``all`` (every neuron: no predictor).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sparseflash.errors import ArtefactError, SparseflashError

STRATEGIES = ("topk", "threshold", "all")


class LayerPredictor:
    def __init__(self, w1, b1, w2, b2, topk: int, cut: float):
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.topk, self.cut = topk, cut

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))

    def to(self, device: torch.device | str) -> None:
        self.w1, self.b1, self.w2, self.b2 = (t.to(device) for t in (self.w1, self.b1, self.w2, self.b2))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)

    def predict(self, x: torch.Tensor, strategy: str, margin: float = 0.0, scores: bool = False):
        """Sorted stored positions predicted active for any token of x (tokens, d); with ``scores``,
        also every neuron's highest logit over the tokens (float32, stored order)."""
        z = self.logits(x)
        if strategy == "topk":
            k = min(z.shape[1], int(np.ceil(self.topk * (1 + margin))))
            idx = torch.topk(z, k, dim=1).indices
            positions = np.unique(idx.cpu().numpy())
        else:
            positions = np.nonzero((z > self.cut - margin).any(dim=0).cpu().numpy())[0]
        if scores:
            return positions, z.max(dim=0).values.float().cpu().numpy()
        return positions


def load_predictors(layout_file, header: dict, num_layers: int, strategy: str | None):
    """(strategy, {layer: LayerPredictor}, {layer: look-ahead LayerPredictor fed with layer-1's input})."""
    meta = header.get("predictors")
    if strategy is None:
        strategy = meta["strategy"] if meta else "all"
    if strategy not in STRATEGIES:
        raise SparseflashError(f"unknown prediction strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if strategy == "all":
        return strategy, {}, {}
    if not meta:
        raise ArtefactError(f"{layout_file.path}: has no predictors; rebuild it with `sparseflash layout "
                            "--predictors DIR` or run with --strategy all")

    def get(name):
        return torch.from_numpy(np.asarray(layout_file.tensor(name), dtype=np.float32))

    own, ahead = {}, {}
    for l in range(num_layers):
        m = meta["layers"][l]
        own[l] = LayerPredictor(*(get(f"pred.layer.{l}.{k}") for k in ("w1", "b1", "w2", "b2")), m["topk"], m["cut"])
        la = meta["lookahead"][l] if meta.get("lookahead") else None
        if la is not None and f"pred.lookahead.{l}.w1" in layout_file.tensors:
            ahead[l] = LayerPredictor(*(get(f"pred.lookahead.{l}.{k}") for k in ("w1", "b1", "w2", "b2")),
                                      la["topk"], la["cut"])
    return strategy, own, ahead
