"""Triton kernels of mxd_fast, one module per op (installed as mxd_fast.kernels).

Each module <op>.py exposes <op>_forward and <op>_backward with the signatures of the torch backend
in mxd_fast/ops/<op>.py. On CPU tensors they run under the Triton interpreter (TRITON_INTERPRET=1).
"""
