"""Weight-only quantization for chat on a CPU, gpt-fast's recipe: a decode step reads every weight
once for one row, at the rate memory streams them, and int8 and int4 weights read a quarter and an
eighth of float32's bytes. --quantize=int4: the blocks' Linears in int4 (a Q4 GGUF file's weights
come back but for bfloat16 scales), the output layer in int8 per group of inputs (in int4 it moves
the logits far more); no float copy is kept. --quantize=int8: every Linear per output channel, with
a bfloat16 copy for several rows (per channel, a Q4 file's weights would move a prefill's logits
past experiments/README.md's bound). Activations stay unquantized (SmolLM2's have outliers 8 bits do
not hold), in bfloat16 (the kernels are slow on float32): a fully quantized model runs in bfloat16,
its KV cache too. A layer of a shape no kernel computes right stays float."""
import functools

import torch
from torch import nn
from torch.nn import functional as F

from model import GPT

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32  # int4: inputs per scale and zero, a GGUF Q4 block
INT4_OUT_MULTIPLE = 16  # the int4 kernel's packing takes output sizes in multiples of 16
INT8_IN_MULTIPLE = 16  # the int8 kernel is right only for input sizes in multiples of 16
DEQUANTIZE_ROWS = 96  # from this many rows on, dequantizing a layer beats its kernel (measured)
# many rows' products: bfloat16 where the CPU computes in it (AVX512-BF16, AMX), else float32
MATMUL_DTYPE = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def int8_weight(weight, group):
    """(out, in) -> (int8 (out, in), bfloat16 scales (out, in / group)), w ~ q * scale per group of
    inputs: the scales are rounded to bfloat16 first, q to them, as the kernels read them."""
    groups = weight.float().view(weight.shape[0], -1, group)
    scale = (groups.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-30).to(torch.bfloat16)
    q = torch.round(groups / scale.float()).clamp(-127, 127).to(torch.int8)
    return q.view_as(weight), scale.squeeze(-1)


def int4_pack(q):
    """(out, in) values 0..15 -> this CPU's packing of them, (out, in / 2) bytes."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def int8_planes(weight):
    """(out, in) -> int8 per group of GROUP_SIZE inputs (GGUF Q8_0's, but bfloat16 scales) as two
    int4 planes in int4_weight's form, stacked: q = 16 * high + low, the int4 products summed."""
    q, scale = int8_weight(weight, GROUP_SIZE)
    scale = scale.t().unsqueeze(-1)  # (groups, out, 1)
    planes = [(q >> 4) + 8, q & 15]  # (q - 8) * scale + zero: high at 16 scale, low at scale
    scales = [torch.cat((16 * scale, 0 * scale), -1), torch.cat((scale, 8 * scale), -1)]
    return torch.stack([int4_pack(p) for p in planes]), torch.stack(scales)


def int4_weight(weight):
    """(out, in) -> (packed (1, out, in / 2), bfloat16 scales and zeros (1, in / GROUP_SIZE, out,
    2)) as _weight_int4pack_mm_for_cpu reads them: w ~ (q - 8) * scale + zero, q in 0..15 spanning
    each group's minimum to maximum. The scale is rounded to bfloat16 first, q to it, then the zero
    is the group's mean remainder: rounding errors that would shift a whole group cancel."""
    groups = weight.float().view(weight.shape[0], -1, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-30).to(torch.bfloat16).float()
    q = torch.round((groups - low) / scale).clamp(0, 15)
    zero = (groups - (q - 8) * scale).mean(-1, keepdim=True)
    scales_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return int4_pack(q.view_as(weight)).unsqueeze(0), scales_zeros.unsqueeze(0)


def int4_values(packed, block, rows=None):
    """The 0..15 values (out, in) of a packing in blocks of `block` output rows, or those of rows:
    per block and input, block / 2 bytes, the low nibbles its first rows, the high ones the rest."""
    half = block // 2
    blocks = packed.view(-1, packed.shape[1] * 2, half)  # (out / block, in, block / 2)
    if rows is None:
        values = torch.cat((blocks & 15, blocks >> 4), -1)  # (out / block, in, block)
        return values.transpose(1, 2).reshape(-1, values.shape[1])
    shift = (4 * (rows % block // half)).to(torch.uint8).unsqueeze(-1)
    return blocks[rows // block, :, rows % half] >> shift & 15  # (rows, in)


@functools.cache
def int4_block():
    """The output rows per block of this CPU's int4 packing (64 or 32), or None: an unknown one."""
    q = (torch.arange(128 * 64, dtype=torch.int32) * 7919 % 16).view(128, 64)  # no pattern
    return next((b for b in (64, 32) if torch.equal(int4_values(int4_pack(q), b).int(), q)), None)


def int4_readable(out_features, in_features):
    """Whether this CPU's int4 packing of a weight of this shape is read back (whole blocks)."""
    return bool(int4_block()) and out_features % int4_block() == 0 and in_features % GROUP_SIZE == 0


def kernel_bits(linear, mode, output_layer):
    """The bits of the kernel that computes this layer's shape right under mode: 4, 8 or None."""
    out_features, in_features = linear.weight.shape
    if mode == "int4" and not output_layer and in_features % GROUP_SIZE == 0 and \
            out_features % INT4_OUT_MULTIPLE == 0:
        return 4
    return 8 if in_features % INT8_IN_MULTIPLE == 0 else None


def shell(out_features, in_features, packings):
    """Empty weight_q and scales of QuantizedLinear's shapes (packings 0: int8 per channel, 1: int4,
    2: int8 planes) on the meta device: the quantizers would import its kernels there (seconds)."""
    with torch.device("meta"):
        if not packings:
            return (torch.empty(out_features, in_features, dtype=torch.int8),
                    torch.empty(out_features, dtype=torch.bfloat16))
        return (torch.empty(packings, out_features, in_features // 2, dtype=torch.uint8),
                torch.empty(packings, in_features // GROUP_SIZE, out_features, 2,
                            dtype=torch.bfloat16))


class QuantizedLinear(nn.Module):
    """A Linear's weights as torch's CPU kernels read them, and its bias: int4, or int8 with a
    scale per output channel or, as planes, per group of inputs (two int4 packings, summed: the
    int8 kernel is slow on a large output layer). bf16_copy: bfloat16 weights for several rows."""

    def __init__(self, linear, bits, bf16_copy=False, planes=False):
        super().__init__()
        self.bits, self.bias = bits, linear.bias
        self.out_features, self.in_features = linear.weight.shape
        weight = linear.weight.detach().contiguous()  # GPT-2's are stored transposed
        self.packed = bits == 4 or planes  # int4 packings: (packings, out, in / 2)
        if weight.is_meta:  # a shell for a quantized state dict (from_state): its shapes only
            weight_q, scales = shell(*weight.shape, 1 + planes if self.packed else 0)
        elif self.packed:
            weight_q, scales = int8_planes(weight) if planes else int4_weight(weight)
        else:  # a scale per output channel
            weight_q, scales = int8_weight(weight, self.in_features)
            scales = scales.view(-1)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales)
        self.register_buffer("weight_bf16", weight.to(torch.bfloat16) if bf16_copy else None)
        self.dequantizable = not self.packed or int4_readable(*weight.shape)

    def extra_repr(self):
        return f"int{self.bits}" + " (two int4 planes)" * (self.packed and self.bits == 8)

    def dequantized(self, rows=None):
        """The weights (out, in), or those of rows, in bfloat16 (in the kernels: float32)."""
        picked = slice(None) if rows is None else rows
        if self.weight_bf16 is not None:
            return self.weight_bf16[picked]
        if not self.packed:
            return self.weight_q[picked].to(torch.bfloat16) * self.scales[picked].unsqueeze(-1)
        weight = 0
        for packed, scales_zeros in zip(self.weight_q, self.scales):
            scale, zero = scales_zeros[:, picked].transpose(0, 1).unsqueeze(-1).contiguous() \
                .unbind(-2)
            q = int4_values(packed, int4_block(), rows).view(*scale.shape[:2], GROUP_SIZE)
            weight = weight + torch.addcmul(zero - 8 * scale, q.to(torch.bfloat16), scale)
        return weight.flatten(-2)  # (q - 8) * scale + zero, per group, each packing

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if (len(rows) > 1 and self.weight_bf16 is not None) or \
                (len(rows) >= DEQUANTIZE_ROWS and self.dequantizable):
            y = F.linear(rows.to(MATMUL_DTYPE), self.dequantized().to(MATMUL_DTYPE))
        elif self.packed:
            y = sum(torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, GROUP_SIZE, sz)
                    for packed, sz in zip(self.weight_q, self.scales))
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_q, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class QuantizedEmbedding(nn.Module):
    """A tied embedding: its rows are the quantized output layer's, dequantized as looked up."""

    def __init__(self, output_layer):
        super().__init__()
        self.rows = output_layer.dequantized  # a method, not a module: its buffers saved once

    def forward(self, idx):
        return self.rows(idx.reshape(-1)).view(*idx.shape, -1)


@torch.no_grad()
def quantize(model, mode):
    """The model (a GPT on the CPU, adapters merged) with every Linear a QuantizedLinear as mode
    and kernel_bits say (int4: the output layer as int8 planes, where the packing takes it), and a
    tied embedding the output layer's rows, in place; "none": unchanged. -> the model."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none" or any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return model  # (quantized already: a cached conversion)
    if model.adapter_params():
        raise ValueError("merge the LoRA adapters into the weights before quantizing")
    tied, head = model.transformer.wte.weight is model.lm_head.weight, model.lm_head
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            bits = isinstance(child, nn.Linear) and kernel_bits(child, mode, child is head)
            if bits:
                planes = mode == "int4" and child is head and int4_readable(*child.weight.shape)
                setattr(parent, name, QuantizedLinear(child, bits, mode == "int8", planes))
    if tied and isinstance(model.lm_head, QuantizedLinear) and model.lm_head.dequantizable:
        model.transformer.wte = QuantizedEmbedding(model.lm_head)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):  # every Linear quantized:
        for p in model.parameters():  # the rest (norms, biases) in bfloat16, as the kernels take
            p.data = p.data.to(torch.bfloat16, copy=True)  # activations, out of any file mapped
    return model


def from_state(config, state, mode):
    """A GPT of config quantized as mode, given the tensors of one (a cached conversion's state)."""
    model = quantize(GPT.from_state(config), mode)
    model.load_state_dict(state, assign=True)
    return model.eval()
