"""download_and_process: URL lists in, per-clip HEVC vstreams out."""

__version__ = "0.1.0"
