"""Can a library's int4 kernel hold our quantized linears at run time on this CPU? (issue 18)

    python benchmarks/int4_kernel.py

PyTorch's int4 CPU kernel (aten._weight_int4pack_mm_for_cpu; torchao's CPU int4 layout calls it)
computes x @ ((q - 8) * scale + zero)^T from 4-bit codes packed two per byte, group-wise along the
input. Our symmetric grid at 2, 3 or 4 bits maps onto it exactly: code - 2**(b-1) + 8, zero 0.
This script checks that mapping against our own dequantization (quant/grid.py) and times the
kernel against a dense matmul on SmolLM2-135M's MLP shapes, for a decode step (1 and 8 tokens,
median of 20) and a prefill (512 tokens, median of 3), after a warm-up, in float32 and bfloat16
activations. Writes docs/int4_kernel.json and prints the table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from layershare.quant.grid import QuantSpec, dequantize, quantize

OUT = Path(__file__).resolve().parents[1] / "docs" / "int4_kernel.json"
SHAPES = [(1536, 576), (576, 1536)]  # up/gate (out, in) and down of SmolLM2-135M


def to_int4(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype):
    """Our symmetric codes (out x in, uint8) and float16 scales (out x groups) as the kernel's
    packed weight and [groups, out, 2] scales-and-zeros."""
    q = (codes.to(torch.int32) - 2 ** (bits - 1) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scales.t().to(dtype), torch.zeros_like(scales.t(), dtype=dtype)], dim=-1).contiguous()
    return packed, sz


def median_us(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e6


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        g = 128 if in_f % 128 == 0 else 64
        for bits in (3, 4):
            spec = QuantSpec(bits, g, True)
            qt = quantize(w, spec)
            ref_w = dequantize(qt)
            x = torch.randn(4, in_f)
            packed, sz = to_int4(qt.codes, qt.scales, bits, torch.float32)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, spec.group_size, sz)
            ref = x @ ref_w.t()
            err = float((y - ref).abs().max() / ref.abs().max())
            rows.append({"shape": [out_f, in_f], "bits": bits, "check": "exactness", "rel_err_fp32": err})
        qt4 = quantize(w, QuantSpec(4, g, True))
        packed4 = {dtype: to_int4(qt4.codes, qt4.scales, 4, dtype) for dtype in (torch.float32, torch.bfloat16)}
        for tokens in (1, 8, 512):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(tokens, in_f, dtype=dtype)
                wd = w.to(dtype)
                packed, sz = packed4[dtype]
                reps = 20 if tokens <= 8 else 3
                dense = median_us(lambda: x @ wd.t(), reps)
                int4 = median_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz), reps)
                rows.append({"shape": [out_f, in_f], "tokens": tokens, "dtype": str(dtype).split(".")[-1],
                             "dense_us": dense, "int4_us": int4, "speed_vs_dense": dense / int4})
    print("| shape (out x in) | tokens | activations | dense us | int4 us | int4 speed vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "tokens" in r:
            print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['tokens']} | {r['dtype']} | {r['dense_us']:.0f} | "
                  f"{r['int4_us']:.0f} | {r['speed_vs_dense']:.2f}x |")
    for r in rows:
        if r.get("check"):
            print(f"exactness {r['shape']} {r['bits']}-bit: max relative error {r['rel_err_fp32']:.1e} (float32)")
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
