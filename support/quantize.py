"""
Weight-only quantization of the one-token decode step, gpt-fast's recipe on a CPU. A decode step multiplies one
row by every weight of the model once, so it runs at the rate the weights stream from memory: SmolLM2's are 538 MB
in float32 (113 MB of them the output layer), read for every token. Copies in int8 and int4 read a quarter and an
eighth of that.

    --quantize=int8   every Linear, output layer included: int8 weights, one scale per output channel
    --quantize=int4   the blocks' Linears: int4 weights, a scale and a zero per group of 32 inputs (int8 where the
                      kernel does not take the shape); the output layer int8

A QuantizedLinear answers a product of one row (a decode step, a prefill's last-token logits) from its quantized
copy, in bfloat16 activations: torch's int8 and int4 CPU kernels take a slow path on float32 ones. A chunk of
several rows (a prefill) runs on the float weights, which it keeps: float kernels compute those faster than these
(bench.py --sections=peers measures both). Why these choices, measured on SmolLM2 at one thread:
- int4 in groups of 32 inputs: a GGUF Q4_0 or Q4_1 matrix (SmolLM2's) holds 4-bit integers with a scale (and a
  minimum) per 32 weights, so these groups give its weights back exactly, but for bfloat16's rounding of the scales;
- the output layer in int8: SmolLM2's is Q8_0 (8 bits), which int4 rounds far more than the rest: with it in int4
  the logits' KL divergence from float32's is 0.040 on average over the README's transcript, 0.0012 with it in int8
  (tests/test_quantize.py holds both modes to 0.005);
- activations quantized too (torch.ao's dynamic int8, fbgemm): twice as fast as these, but SmolLM2's activations
  have outliers that 8 bits per row do not hold: logits up to 14 away from float32's.
"""
import torch
from torch import nn

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32  # int4: inputs per scale and zero, a GGUF Q4 block
INT4_OUT_MULTIPLE = 16  # the int4 kernel's packing takes output sizes in multiples of 16


def int8_weight(weight):
    """(out, in) float -> (int8 (out, in), bfloat16 scale per output channel): w ~ q * scale, symmetric. The scales
    are rounded to bfloat16 first and the weights to them, so that what the kernel computes is off by half a step at
    most."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30).to(torch.bfloat16)
    return torch.round(weight / scale.float()).clamp(-127, 127).to(torch.int8), scale.squeeze(1)


def int4_weight(weight):
    """(out, in) float -> (packed int4 weight, bfloat16 scales and zeros (in / GROUP_SIZE, out, 2)) as torch's
    _weight_int4pack_mm_for_cpu reads them: w ~ (q - 8) * scale + zero, q in 0..15, each group of GROUP_SIZE inputs
    spanning its minimum (q = 0) to its maximum (q = 15), the scales and zeros rounded to bfloat16 first."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-30).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((groups - zero) / scale + 8).clamp(0, 15).to(torch.int32).view(out_features, in_features)
    scales_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def int4_fits(linear):
    out_features, in_features = linear.weight.shape
    return in_features % GROUP_SIZE == 0 and out_features % INT4_OUT_MULTIPLE == 0


class QuantizedLinear(nn.Module):
    """A Linear whose one-row products read an int8 or int4 copy of its weights; `linear`, the float layer, computes
    chunks of several rows."""

    def __init__(self, linear, bits):
        super().__init__()
        self.linear, self.bits = linear, bits
        weight_q, scales = int4_weight(linear.weight) if bits == 4 else int8_weight(linear.weight)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales)

    def extra_repr(self):
        return f"int{self.bits}"

    def forward(self, x):
        if x.shape[:-1].numel() != 1:
            return self.linear(x)
        row = x.reshape(1, -1).to(torch.bfloat16)
        if self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(row, self.weight_q, GROUP_SIZE, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(row, self.weight_q, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.linear.bias is None else y + self.linear.bias


@torch.no_grad()
def quantize(model, mode):
    """The model (a GPT on the CPU, without LoRA adapters: merge them first) with every Linear a QuantizedLinear as
    `mode` says (see the module docstring), in place; "none": unchanged. -> the model."""
    if mode == "none":
        return model
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if model.config.lora_rank:
        raise ValueError("merge the LoRA adapters into the weights before quantizing")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                int4 = mode == "int4" and child is not model.lm_head and int4_fits(child)
                setattr(parent, name, QuantizedLinear(child, 4 if int4 else 8))
    return model
