"""The torch backend: each op's forward and backward written with torch operations, on any device
(`<op>_torch_forward` / `<op>_torch_backward` in `<op>.py`, with the argument names of the kernel
contract that every backend shares: see the backend table, mxd_fast/ops/_table.py). Arguments are
flat ([B, ...] tokens), already checked by the op; no function forms a [B, N] tensor."""
