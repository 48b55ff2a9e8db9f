"""GPU path: device probing, GPU slots, NVDEC/NVENC backends and NV12 colour conversion.

Nothing here imports PyNvVideoCodec at import time: a machine without an NVIDIA driver imports the
project as usual and runs the CPU path.
"""
