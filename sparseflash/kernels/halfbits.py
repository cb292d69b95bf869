"""Numba intrinsic that widens one stored bundle element to float32 inside a compiled loop.

Numba's CPU target has no float16 type, so half-precision bundles reach the kernels as raw
16-bit integers, and the integer type says how to read them:
    float32 -> as is
    uint16  -> IEEE float16 bits (LLVM fpext half->float; vcvtph2ps on x86 with F16C)
    int16   -> bfloat16 bits (zero-extend, shift left 16, reinterpret as float32)
Both conversions are exact and vectorise, so no bundle is ever converted as a whole.
Importing this module imports numba but compiles nothing.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# numpy dtype the CPU kernels receive for each storage (a zero-copy view of the bundle matrix).
KERNEL_DTYPE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.uint16), "bf16": np.dtype(np.int16)}


def kernel_view(bundles: np.ndarray, storage: str) -> np.ndarray:
    """Zero-copy view of a bundle matrix with the dtype that selects the right decoder."""
    return bundles.view(KERNEL_DTYPE[storage])


@intrinsic
def to_f32(typingctx, value):
    """float32 value of one stored element (float32, f16 bits as uint16, bf16 bits as int16)."""
    if value == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
    elif value == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif value == types.int16:
        def codegen(context, builder, sig, args):
            wide = builder.zext(args[0], ir.IntType(32))
            wide = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
    else:
        return None
    return types.float32(value), codegen


@intrinsic
def q4_pair(typingctx, byte):
    """(value i, value i + 16) of a q4 group from its byte i (uint8): the low and high nibble minus 8, float32.

    Computed in 8-bit integers then converted, so a loop over bytes vectorises 16 or more lanes wide
    (numba's own integer arithmetic would widen to int64 first).
    """
    if byte != types.uint8:
        return None
    sig = types.UniTuple(types.float32, 2)(byte)

    def codegen(context, builder, sig, args):
        f32, i8 = ir.FloatType(), ir.IntType(8)
        low = builder.and_(args[0], ir.Constant(i8, 15))
        high = builder.lshr(args[0], ir.Constant(i8, 4))
        eight = ir.Constant(f32, 8.0)
        values = (builder.fsub(builder.uitofp(low, f32), eight), builder.fsub(builder.uitofp(high, f32), eight))
        return context.make_tuple(builder, sig.return_type, values)

    return sig, codegen
