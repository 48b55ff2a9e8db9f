"""What needs a GPU: the probe, NVDEC/NVENC, NV12 colour conversion, and the slots that share a device.

Nothing here imports PyNvVideoCodec at import time: a machine without an NVIDIA driver imports the
project as usual and runs the CPU path. Which backends a worker uses is decided in daemon.backends.
"""
