"""One LoRA adapter's weights: on a linear-like layer (A, B, optional DoRA magnitude) or an embedding.

Attribute names are PEFT's (`lora_A`, `lora_B`, `lora_magnitude_vector`, `lora_embedding_A/B`), so the
saved keys are PEFT's once `adapters.<name>.` is dropped (see adapter_layer.py, Note: adapter naming).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraLinearAdapter(nn.Module):
    """delta(x) = B(A(dropout(x))) * scaling, with A: (r, in) and B: (out, r).

    Creation consumes the random stream in peft's order (nn.Linear A, nn.Linear B, then the init),
    so the same seed gives the same initial weights as peft.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool) -> None:
        super().__init__()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_magnitude_vector: nn.Parameter | None = None

    def reset(self, init: bool | str) -> None:
        """True: A Kaiming-uniform (nn.Linear's default), B zero; 'gaussian': A ~ N(0, 1/r), B zero."""
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        if init is not False:
            nn.init.zeros_(self.lora_B.weight)

    def pissa(self, weight: torch.Tensor, niter: int) -> torch.Tensor:
        """PiSSA: A, B from the top-r singular triplets of W (out, in); returns the residual W - s*B A."""
        w = weight.float()
        if niter == 0:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
        else:
            u, s, v = torch.svd_lowrank(w, q=self.r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / self.scaling)
        self.lora_A.weight.data = (torch.diag(root) @ vh).to(self.lora_A.weight.dtype)
        self.lora_B.weight.data = (u @ torch.diag(root)).to(self.lora_B.weight.dtype)
        return (w - self.scaling * self.lora_B.weight.float() @ self.lora_A.weight.float()).to(weight.dtype)

    def init_dora(self, weight: torch.Tensor) -> None:
        """DoRA's magnitude starts as the row norms of W + s*B A (so the output is unchanged)."""
        norm = self.weight_norm(weight.float(), self.product().float().detach())
        self.lora_magnitude_vector = nn.Parameter(norm)

    def product(self) -> torch.Tensor:
        """B A, shape (out, in), without the scaling."""
        return self.lora_B.weight @ self.lora_A.weight

    def weight_norm(self, weight: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        """Row norms ||W + s*B A||, shape (out,)."""
        return torch.linalg.norm(weight + self.scaling * product, dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_weight: torch.Tensor | None,
                base_bias: torch.Tensor | None) -> torch.Tensor:
        """The adapter's contribution to add to base_out (x cast to the adapter dtype by the caller)."""
        if self.lora_magnitude_vector is None:
            return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return self._dora(x, base_out, base_weight, base_bias)

    def _dora(self, x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """m / ||W + sBA|| * (W + sBA) x - W x, the norm detached as in the DoRA paper (section 4.3)."""
        weight = weight.to(x.dtype)
        norm = self.weight_norm(weight, self.product().to(x.dtype).detach()).detach()
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = base_out if bias is None else base_out - bias
        else:
            x = self.lora_dropout(x)
            plain = F.linear(x, weight)
        return (scale - 1) * plain + scale * self.lora_B(self.lora_A(x)) * self.scaling

    def delta_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new_weight - weight, dora_norm) for merging into W (out, in); dora_norm is kept for unmerge."""
        delta = (self.product().float() * self.scaling)
        if self.lora_magnitude_vector is None:
            return delta, None
        norm = torch.linalg.norm(weight.float() + delta, dim=1).detach()
        factor = (self.lora_magnitude_vector.float() / norm).view(-1, 1)
        return factor * (weight.float() + delta) - weight.float(), norm

    def undo_delta(self, merged: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """The original W (out, in) from a merged weight."""
        delta = self.product().float() * self.scaling
        if norm is None:
            return merged.float() - delta
        factor = (self.lora_magnitude_vector.float() / norm).view(-1, 1)
        return merged.float() / factor - delta


class LoraEmbeddingAdapter(nn.Module):
    """delta(ids) = embedding(ids, A^T) @ B^T * scaling, with A: (r, num_embeddings), B: (dim, r).

    As in peft (and the original loralib), A starts at zero and B normal.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.randn((r, num_embeddings)))
        self.lora_embedding_B = nn.Parameter(torch.randn((embedding_dim, r)))
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r

    def reset(self, init: bool | str) -> None:
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (after_a @ self.lora_embedding_B.T) * self.scaling

    def delta_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Delta for the (num_embeddings, dim) table."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T.float() * self.scaling, None

    def undo_delta(self, merged: torch.Tensor, norm: None) -> torch.Tensor:
        return merged.float() - self.delta_weight(merged)[0]
