"""Kernel tests run on the GPU when there is one, else on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here before any kernel module is imported).

The interpreter computes ``tl.dot`` on bf16 wrongly (numpy has no bf16), so on the CPU the
attention kernels are tested in fp32/fp16 and bf16 is left to the GPU; element-wise kernels
are tested in bf16 everywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
