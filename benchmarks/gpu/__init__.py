"""The GPU check that benchmarks/gpu.sh runs: the vision server's model and the feature path
on one GPU, with random weights, needing neither vLLM nor a checkpoint on disk.

Modules: `shapes` (InternViT-300M / -6B configs built in code, FLOPs per tile), `vit`
(matmul ceiling, tiles/s per batch), `transfer` (features from device memory to a second
process through each transport, with device-to-host, memcpy and socket ceilings), `stubs`
(dvd/v1 gRPC stubs where grpcio-tools is missing), `main` (sections, budget, reports).
"""
