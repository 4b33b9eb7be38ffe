"""A cache prefetch hint for numba kernels: ``prefetch(array, index)``.

The reference loop's cost on a large working set is not work but waiting: each
reference reads an alias row, then the page's v2p entry, then its frame's state, each
a likely cache miss that needs the one before it, so the processor cannot overlap
them. Asking for those lines a few references ahead lets the misses of several
references run at once. A prefetch is only a hint: it changes no value, so results
stay exactly the same; an index it is given must still lie inside the array.

numba has no prefetch of its own; this emits LLVM's ``llvm.prefetch`` intrinsic.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# llvm.prefetch(address, rw, locality, cache type)
_READ = 0
_KEEP_IN_ALL_LEVELS = 3
_DATA_CACHE = 1


def _typed(typingctx: Any, array: Any, index: Any) -> Any:
    """numba's typing step: ``prefetch(array, index)`` returns nothing; the code it
    stands for follows."""
    sig = types.void(array, index)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(  # type: ignore[no-untyped-call]
            context, builder, array_type, view, [args[1]], wraparound=False
        )
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        builder.call(
            function,
            [
                builder.bitcast(pointer, byte_pointer),
                ir.Constant(i32, _READ),
                ir.Constant(i32, _KEEP_IN_ALL_LEVELS),
                ir.Constant(i32, _DATA_CACHE),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


#: ``prefetch(array, index)``: hint that ``array[index]`` (a row, for a 2-D array) is
#: about to be read. Callable from numba-compiled code only.
prefetch: Any = intrinsic(_typed)

__all__ = ["prefetch"]
