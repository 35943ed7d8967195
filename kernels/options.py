"""Options every launch of these kernels passes.

``FMA``: Triton contracts a·b + c into one fused multiply-add only where the compile allows it
(``enable_fp_fusion``), and its default turns that off from Triton 3.10 on (3.9 warns at the
first compile of each process that it will).  The kernels' loops, their instruction counts and
the tuned tiles were measured with the contraction, as every Triton release so far has compiled
them, so each launch asks for it."""
FMA = {"enable_fp_fusion": True}
