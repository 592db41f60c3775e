"""
Weight-only quantization of the one-token decode step on a CPU, gpt-fast's recipe. A decode step
reads every weight once for one row, so it runs at the rate the weights stream from memory: int8
and int4 copies read a quarter and an eighth of float32's bytes.

    --quantize=int8   every Linear, output layer included: one scale per output channel
    --quantize=int4   the blocks' Linears: a scale and a zero per group of 32 inputs (int8 where
                      the kernel does not take the shape); the output layer int8

A layer of a shape no kernel computes right stays float: torch's int8 kernel returns garbage (NaN,
1e30) unless the inputs are a multiple of 16, and int4's packing takes groups of 32 inputs and
outputs in multiples of 16.

A QuantizedLinear answers a one-row product from its quantized copy, in bfloat16 activations
(torch's int8 and int4 CPU kernels are slow on float32 ones); several rows (a prefill) run on the
float weights it keeps, which compute those faster. Why: groups of 32 are a GGUF Q4 block (a Q4
file's weights come back exactly, but for bfloat16 scales); the output layer stays int8 (in int4 it
moves the logits far more than the rest); activations stay unquantized (SmolLM2's have outliers
that 8 bits per row do not hold).
"""
import torch
from torch import nn

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32  # int4: inputs per scale and zero, a GGUF Q4 block
INT4_OUT_MULTIPLE = 16  # the int4 kernel's packing takes output sizes in multiples of 16
INT8_IN_MULTIPLE = 16  # the int8 kernel is right only for input sizes in multiples of 16


def int8_weight(weight):
    """(out, in) float -> (int8 (out, in), bfloat16 scale per output channel), w ~ q * scale. The
    scales are rounded to bfloat16 first, the weights to them: the kernel is off by half a step."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
    scale = scale.to(torch.bfloat16)
    return torch.round(weight / scale.float()).clamp(-127, 127).to(torch.int8), scale.squeeze(1)


def int4_weight(weight):
    """(out, in) float -> (packed int4, bfloat16 scales and zeros (in / GROUP_SIZE, out, 2)) as
    _weight_int4pack_mm_for_cpu reads them: w ~ (q - 8) * scale + zero, q in 0..15 spanning each
    group's minimum to its maximum, scales and zeros rounded to bfloat16 first."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-30).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32)
    scales_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_features, -1), 1)
    return packed, scales_zeros


def kernel_bits(linear, mode, output_layer):
    """The bits of the kernel that computes this layer's shape right under mode: 4, 8 or None."""
    out_features, in_features = linear.weight.shape
    if mode == "int4" and not output_layer and in_features % GROUP_SIZE == 0 and \
            out_features % INT4_OUT_MULTIPLE == 0:
        return 4
    return 8 if in_features % INT8_IN_MULTIPLE == 0 else None


class QuantizedLinear(nn.Module):
    """A Linear whose one-row products read an int8 or int4 copy of its weights; `linear`, the
    float layer, computes several rows."""

    def __init__(self, linear, bits):
        super().__init__()
        self.linear, self.bits = linear, bits
        weight = linear.weight.contiguous()  # the kernels read rows: GPT-2's are stored transposed
        weight_q, scales = int4_weight(weight) if bits == 4 else int8_weight(weight)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales)

    def extra_repr(self):
        return f"int{self.bits}"

    def forward(self, x):
        if x.shape[:-1].numel() != 1:
            return self.linear(x)
        row = x.reshape(1, -1).to(torch.bfloat16)
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(row, self.weight_q, GROUP_SIZE,
                                                           self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(row, self.weight_q, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.linear.bias is None else y + self.linear.bias


@torch.no_grad()
def quantize(model, mode):
    """The model (a GPT on the CPU, adapters merged) with every Linear a QuantizedLinear as mode
    and kernel_bits say, in place; "none": unchanged. -> the model."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if model.adapter_params():
        raise ValueError("merge the LoRA adapters into the weights before quantizing")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            bits = isinstance(child, nn.Linear) and kernel_bits(child, mode, child is model.lm_head)
            if bits:
                setattr(parent, name, QuantizedLinear(child, bits))
    return model
