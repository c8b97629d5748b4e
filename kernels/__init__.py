"""Triton kernels of mxd_fast, one module per op (installed as mxd_fast.kernels).

Each module <op>.py exposes <op>_forward and <op>_backward with the signatures of the torch backend
(mxd_fast/_torch/<op>.py), and the limits of what they take; the package's backend table (ops/_table.py)
names these functions and runs other arguments on the torch backend. Nothing here imports the ops.
On CPU tensors the kernels run under the Triton interpreter (TRITON_INTERPRET=1).
"""
