"""Software prefetch of table rows for compiled loops that gather them in random order.

The CG row loop (:mod:`mf_dist.solvers.row_cg_loop`) reads, entry by entry,
the other side's row that each entry points at: random rows of a table of tens of MB,
one cache miss each that the hardware prefetcher cannot foresee. Asking for
the rows of the entries a few places ahead (LLVM's ``llvm.prefetch``) lets
those misses overlap the arithmetic on the current ones. At ML-20M's shape,
k = 64, one core: a block of items went from 86–128 ms to 29–54 ms in the CG
loop with this and its four-entry passes, a block of users from 18 to 9 ms.

A prefetch is a hint: it never faults and changes no result.

Numba's disk cache of a loop that calls :func:`prefetch_rows` is keyed by
the loop's own source file only; a change here needs those files touched
(or ``__pycache__`` cleared) to take effect in development. Like the other
compiled loops, these are module-level functions: numba keys the disk cache
of a closure by its pickled cell contents, and a compiled function pickles
differently in every process, so a loop defined inside a function was
compiled again by every worker (3–7 s each).
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# A cache line on every x86-64 and ARM server CPU we target.
CACHE_LINE_BYTES = 64


@intrinsic
def prefetch_line(typingctx, address):  # noqa: ANN001, ANN201
    """``llvm.prefetch`` of the byte at ``address`` (an integer), for reading, into every cache level."""

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        byte_pointer = ir.IntType(8).as_pointer()
        word = ir.IntType(32)
        # declare_intrinsic mangles the name for the pointer type (p0i8), which
        # LLVM versions with opaque pointers also accept.
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, word, word, word])
        )
        # (address, read, keep in all cache levels, data cache)
        hint = [ir.Constant(word, 0), ir.Constant(word, 3), ir.Constant(word, 1)]
        builder.call(function, [builder.inttoptr(args[0], byte_pointer), *hint])
        return context.get_dummy_value()

    return types.void(types.intp), codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def prefetch_rows(table, indices, start, stop):  # noqa: ANN001, ANN201
    """Hint rows ``table[indices[start:stop]]`` into the cache (call from compiled loops).

    ``table`` is a C-contiguous 2-D array; ``indices`` index its rows; positions
    past the end of ``indices`` are skipped, so callers may ask beyond the
    entries they have.
    """
    origin = table.ctypes.data
    stride = table.strides[0]
    width = table.shape[1] * table.itemsize
    for position in range(start, min(stop, len(indices))):
        row = origin + indices[position] * stride
        # Every line the row touches, from the line it starts in.
        for line in range(row - row % CACHE_LINE_BYTES, row + width, CACHE_LINE_BYTES):
            prefetch_line(line)
