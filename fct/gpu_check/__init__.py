"""GPU readiness in one command: ``python -m fct.gpu_check`` (``make gpu-check``).

Sections, each timed and each recording its own failure: the CUDA-only tests, DDP on NCCL with
SyncBatchNorm on 2..G GPUs against one, training throughput per architecture (fp32 / bf16 x
contiguous / channels_last), torch.compile on and off, exact evaluation at 1M x 128 (the torch
engine and faiss-gpu), and the feature cache's speed-up. The report: ``report.json`` and
``report.md`` in the output folder. ``--cpu`` runs every section at tiny sizes on the CPU.
See docs/benchmarks/gpu.md. Nothing is imported here, so ``python -m fct.gpu_check.child`` starts
light.
"""
