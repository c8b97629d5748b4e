"""Optional adapters to other interpretability libraries. Each is a submodule that imports its library
when imported itself, so `import mxd_fast` never does:

- mxd_fast.integrations.saelens: MxD layers as SAELens SAEs (the "mxd" architecture), TopK transcoders
  exported to SAELens's built-in format. Needs sae-lens 6.
- mxd_fast.integrations.sparsify: mxd_fast.gather_combine as the sparse decoder of EleutherAI
  sparsify's SparseCoder. Needs eai-sparsify.
"""
