"""Memory-saving autograd for the GELU MLP (numerically the same computation).

In ``fc2(gelu(fc1(x)))`` autograd keeps both ``fc1(x)`` (for GELU's backward) and
``gelu(fc1(x))`` (for fc2's weight gradient): 2 x hidden values per pixel, the largest
activations of an InternImage block. :class:`GeluMLPFunction` keeps only ``fc1(x)`` and
recomputes the GELU in the backward pass (one element-wise op), which cuts the stored
activations of an InternImage-T training step by about a fifth. Forward values are
bit-identical; gradients are the same products as aten's linear backward, equal up to
rounding. Double backward is not supported (it raises).
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _flat(t):
    return t.reshape(-1, t.shape[-1])


class GeluMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate):
        hidden = F.linear(x, w1, b1)
        out = F.linear(F.gelu(hidden, approximate=approximate), w2, b2)
        ctx.save_for_backward(x, w1, hidden, w2)
        ctx.approximate = approximate
        ctx.has_bias = (b1 is not None, b2 is not None)
        return out

    @staticmethod
    @once_differentiable  # the recomputation is not itself differentiated: no double backward
    def backward(ctx, grad_out):
        x, w1, hidden, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grad_out2 = _flat(grad_out)
        hidden2 = _flat(hidden)
        grad_w2 = grad_b2 = grad_x = grad_w1 = grad_b1 = None
        if need_w2:
            grad_w2 = grad_out2.t().mm(F.gelu(hidden2, approximate=ctx.approximate))
        if need_b2 and ctx.has_bias[1]:
            grad_b2 = grad_out2.sum(0)
        if need_x or need_w1 or need_b1:
            grad_hidden = torch.ops.aten.gelu_backward(grad_out2.mm(w2), hidden2, approximate=ctx.approximate)
            if need_w1:
                grad_w1 = grad_hidden.t().mm(_flat(x))
            if need_b1 and ctx.has_bias[0]:
                grad_b1 = grad_hidden.sum(0)
            if need_x:
                grad_x = grad_hidden.mm(w1).view(x.shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def gelu_mlp(x, fc1: torch.nn.Linear, fc2: torch.nn.Linear, approximate: str = "none"):
    """``fc2(gelu(fc1(x)))`` keeping only ``fc1(x)`` for the backward pass."""
    return GeluMLPFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate)
