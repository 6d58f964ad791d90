"""Triton kernels, one module per fused op, named like the op. Imported lazily by fastrob.ops so
that ``import fastrob`` does not import triton."""
