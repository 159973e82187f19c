"""Training-mode batch norm whose double backward is the fused op
``torch.ops.amaml_ext.batch_norm_double_backward``.

:class:`BatchNormTrain` is ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``
(statistics of the batch; running statistics are the module's business, see
:class:`FusedBatchNorm`) as an autograd Function: its forward is aten's ``native_batch_norm``, its
backward the Function :class:`BatchNormBackward` (forward: aten's ``native_batch_norm_backward``;
backward: the fused op, as the Function :class:`BatchNormDoubleBackward`). First and second
derivatives are aten's; a third derivative (which aten's batch norm refuses) is the VJP of the
plain-torch mirror (:mod:`amaml_ext.ops.reference`), the statistics recomputed from ``x``. Both Functions carry ``generate_vmap_rule``,
and the fused op has a batching rule (:mod:`amaml_ext.ops`), so they run under
``torch.func.vmap`` over problems (tasks) and under ``torch.func`` transforms.

Example::

    >>> x, w, b = torch.randn(5, 3, 4, 4), torch.rand(3) + 0.5, torch.randn(3)
    >>> y = batch_norm_train(x, w, b)
    >>> torch.allclose(y, F.batch_norm(x, None, None, w, b, training=True), atol=1e-6)
    True
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import batch_norm_double_backward, reference

__all__ = ["BatchNormTrain", "BatchNormBackward", "BatchNormDoubleBackward", "batch_norm_train", "FusedBatchNorm",
           "use_fused_batch_norm"]


class BatchNormBackward(torch.autograd.Function):
    """``(gx, gw, gb) = native_batch_norm_backward(gy, x, weight, mean, invstd)`` in training
    mode; its backward is the fused double backward. ``mean``/``invstd`` are the forward's saved
    statistics, taken as constants here: the fused op carries their dependence on ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out, x, weight, mean, invstd, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        return gx, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, mean, invstd, eps = inputs
        ctx.save_for_backward(grad_out, x, weight, mean, invstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_out, x, weight, mean, invstd = ctx.saved_tensors
        if ggx is None and ggw is None and ggb is None:
            return None, None, None, None, None, None
        gi, gg, ggo = BatchNormDoubleBackward.apply(x, weight, mean, invstd, grad_out, ggx, ggw, ggb,
                                                    ctx.eps)
        return ggo, gi, (gg if weight is not None else None), None, None, None


class BatchNormDoubleBackward(torch.autograd.Function):
    """The fused op as a Function: ``(grad_x, grad_weight, grad_grad_out)``. Its own backward (a
    third derivative, asked for only where the double backward is differentiated) is the VJP of
    the plain-torch mirror with the statistics recomputed from ``x``, evaluated only then; under
    ``torch.func.grad``, which keeps the graph of every backward, the values stay the fused op's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, mean, invstd, grad_out, ggx, ggw, ggb, eps):
        return batch_norm_double_backward(x, weight, mean, invstd, grad_out, ggx, ggw, ggb)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, _, grad_out, ggx, ggw, ggb, eps = inputs
        ctx.save_for_backward(x, weight, grad_out, ggx, ggw, ggb)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, *cotangents):
        saved = ctx.saved_tensors
        given = [j for j, t in enumerate(saved) if t is not None]

        def mirror(*ts):
            args = list(saved)
            for j, t in zip(given, ts):
                args[j] = t
            x, weight, grad_out, ggx, ggw, ggb = args
            var, mean = torch.var_mean(x, [0] + list(range(2, x.dim())), correction=0)
            return reference.batch_norm_double_backward(x, weight, mean, torch.rsqrt(var + ctx.eps),
                                                        grad_out, ggx, ggw, ggb)

        outs, vjp = torch.func.vjp(mirror, *(saved[j] for j in given))
        cts = tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outs, cotangents))
        grads = dict(zip(given, vjp(cts)))
        x, w, gy, q, gw, gb = (grads.get(j) for j in range(6))
        return x, w, None, None, gy, q, gw, gb, None


class BatchNormTrain(torch.autograd.Function):
    """``(y, mean, invstd) = native_batch_norm(x, weight, bias, training=True, eps)``; mean and
    invstd are returned (non-differentiable) so that the backward may use them under the
    functorch transforms. Use :func:`batch_norm_train` for ``y`` alone."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, (gw if weight is not None else None), (gb if ctx.has_bias else None), None


def batch_norm_train(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` through
    :class:`BatchNormTrain` (``x``: ``[N, C, *]``, float32 or float64)."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"batch_norm_train: x must be float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"batch_norm_train: x must have shape [N, C, *], got {list(x.shape)}")
    return BatchNormTrain.apply(x, weight, bias, float(eps))[0]


class FusedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer (any number of dimensions) that normalises with the batch's statistics
    through :func:`batch_norm_train` wherever ``nn.BatchNorm*d`` would (training, or no running
    statistics), updating the running statistics as it does; elsewhere ``F.batch_norm``."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"FusedBatchNorm: expected an input [N, C, *], got {list(x.shape)}")

    def forward(self, x):
        if not (self.training or self.running_mean is None):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(x)
        return batch_norm_train(x, self.weight, self.bias, self.eps)

    @torch.no_grad()
    def _update_running_stats(self, x):
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        dims = [0] + list(range(2, x.dim()))
        m = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dims, correction=0)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var * (m / max(m - 1, 1)), momentum)


def use_fused_batch_norm(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.BatchNorm1d/2d/3d`` of ``model`` by a
    :class:`FusedBatchNorm` sharing its parameters and buffers; returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, FusedBatchNorm):
            fused = FusedBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=_device_of(child),
                                   dtype=_dtype_of(child))
            fused.weight, fused.bias = child.weight, child.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(fused, buf, getattr(child, buf))
            fused.train(child.training)
            setattr(model, name, fused)
        else:
            use_fused_batch_norm(child)
    return model


def _device_of(m: nn.Module):
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return None if t is None else t.device


def _dtype_of(m: nn.Module):
    t = next(iter(m.parameters()), None)
    return None if t is None else t.dtype
