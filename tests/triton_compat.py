"""Test-environment fixes for Triton's CPU interpreter (none of this runs on a GPU).

Triton <= 3.6's interpreter turns a scalar it holds (a one-element numpy array) into a loop bound
or an index with ``int(handle.data)``; numpy >= 2.4 refuses ``int()`` of an array with a dimension
("only 0-dimensional arrays can be converted to Python scalars"). Newer Triton squeezes first:
``int(handle.data.squeeze())``. The GPU machine runs Triton 3.6 with numpy 2.5, but compiles the
kernels for real, so only the interpreter (our CPU tests) meets this. The fix below gives old
interpreters the newer conversion; the value converted is the same, so nothing the kernel tests
compare changes.
"""

from __future__ import annotations

import inspect


def make_interpreter_accept_new_numpy() -> bool:
    """Patch the interpreter's tensor-to-int conversion where it lacks the squeeze; True if patched."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "squeezes_scalars", False) or "squeeze" in inspect.getsource(patch_tensor):
        return False

    def patch_tensor_squeezing(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing
    return True
