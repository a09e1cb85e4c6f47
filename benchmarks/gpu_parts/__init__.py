"""The parts of benchmarks/gpu_check.py, one module per measurement (the driver runs them in order).

    common.py    sizes (GPU and dry run), the run context and deadlines, timing, the shared
                 trained ResNet-50 and its converted copy, model helpers
    env.py       torch, CUDA, cuSPARSELt, triton, the GPU
    gpu_tests.py the `gpu`-marked tests (pytest -m gpu)
    numerics.py  verify in float64/float32, and each 2:4 kernel against the dense model in fp16/bf16
    advisor.py   the 2:4 advisor's per-layer verdict against what torch packs and runs
    layers.py    every N:M conv/linear of ResNet-50: dense against 2:4, the im2col gather, the GEMMs
    linear.py    a Linear-heavy model (MLP blocks at ViT-B widths): the Linear 2:4 figures
    e2e.py       the whole deployed model at training-size batches, and latency at batch 1-16
    train.py     training steps dense / N:M / SpRe (bf16 autocast, and fp16 with a GradScaler),
                 the mask update's share of a step, a profile
    report.py    gpu_check.md: one section and its checks per part

Each part module has `NAME`, `CAP` (seconds on the GPU), `NEED` (seconds it must have left to
start), `run(ctx, rec)` (fills the part's record) and `report(rec, dry)` (its markdown section
and its rows of the checks table).
"""
