"""Triton kernels of localsgl (installed as ``localsgl_kernels``).

Each module states its math and its floor (bytes moved / FLOPs) in its docstring and keeps a
torch reference next to the kernel (or in the layer it replaces):

  rmsnorm            rmsnorm, fused_add_rmsnorm (also [T, heads, D] q/k norm)
  activation         silu_and_mul
  rotary             apply_rotary (neox layout, in place on strided q/k views)
  kv_store           store_kv (scatter new K/V into the paged pool)
  decode_attention   paged split-KV decode attention (GQA, CUDA-graph safe)
  extend_attention   ragged extend/prefill attention over a cached prefix (GQA, causal)
  sampling           filtered_sample (top-k/top-p/min-p exponential race), apply_penalties, argmax_rows
  gemv               one-row GEMVs with the batch-1 decode step's small ops fused in
  quant_gemv         gemv's kernels over quantized weights (int4 / int8 / fp8, dequantized in registers)
  quant_gemm         x Wᵀ over quantized weights for any row count (dequantized tiles into tl.dot)
  step_inputs        the decode graph's inputs on the device (placeholders, lengths, slot table)
  compile_ahead      compile a code path's kernels together, in parallel (cold start)
  pdl                programmatic dependent launch (Hopper+): launch early, wait for the predecessor

Tests: tests/kernels (Triton interpreter on CPU, native on GPU) and tests/gpu.
"""
