"""Triton GPU kernels (packaged as ``sparsekit.kernels``): every sparsekit op on CUDA tensors.

Modules, each a kernel beside its launcher and the custom ops / autograd that use it:

- ``gemm``    tiled GEMM with bias and a fused epilogue (ReLU, JumpReLU, exp, multiply)
- ``select``  radix top-k selection per row (TopK) and over the batch (BatchTopK)
- ``fused_topk``  TopK with the selection fused into the GEMM's epilogue (pre never written)
- ``sparse``  sparse products: gathered decode, sampled dot products, segment sums / atomics
- ``encode``  topk / batchtopk / relu / jumprelu encoders as custom ops, their backward
- ``decode``  sparse_decode (TopK and COO codes) as a custom op, its backward
- ``ghost``   the ghost-grads term over dead latents only

Nothing here is imported by ``import sparsekit``: ``sparsekit.ops`` imports these modules on first
use (Triton is slow to import and absent on some machines). Triton reads ``TRITON_INTERPRET`` when
a kernel is decorated, so on a machine without a GPU set ``TRITON_INTERPRET=1`` before the first
import to run the kernels on CPU tensors (the tests do, in tests/conftest.py).
"""
