"""The fused CUDA kernels of ``kernels/``: a prepack step (pure tensor functions that reorder
the canonical checkpoint layout into the kernels' layout) and a CuPy launcher."""
