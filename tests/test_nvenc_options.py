"""The NVENC settings are ones PyNvVideoCodec reads, checked against the installed module itself, so a
misspelt option cannot wait for a GPU machine to be noticed; and the CPU path's rate control, GOP and
colour carry over."""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings
from daemon.gpu.nvcodec import nvenc_options


def binding_strings() -> bytes:
    """Every extension module of the installed PyNvVideoCodec, as bytes."""
    spec = importlib.util.find_spec("PyNvVideoCodec")
    if spec is None or spec.origin is None:
        pytest.skip("PyNvVideoCodec is not installed (the `gpu` extra)")
    return b"".join(path.read_bytes() for path in Path(spec.origin).parent.glob("PyNvVideoCodec_*.so"))


def test_every_option_and_named_value_is_one_the_binding_knows() -> None:
    strings = binding_strings()
    settings = load_settings(None, {"encode.nvenc_tuning": "ull"}).encode
    options = nvenc_options(settings, Fraction(30000, 1001), device_id=1)
    for key in options:
        # The option table is compiled in as NUL-terminated names.
        assert key.encode() + b"\0" in strings, key
    for key in ("codec", "preset", "tuning_info", "rc"):
        assert options[key].encode() + b"\0" in strings, (key, options[key])
    for key in (
        "gpu_id",
        "cq",
        "bitrate",
        "maxbitrate",
        "vbvbufsize",
        "gop",
        "idrperiod",
        "fps",
        "repeatspspps",
    ):
        assert options[key].isdigit(), (key, options[key])


def test_the_settings_match_the_cpu_encoder() -> None:
    settings = load_settings(
        None,
        {"encode.crf": 26, "encode.max_bitrate_kbps": 3000, "encode.buffer_kbits": 6000, "encode.gop": 120},
    ).encode
    options = nvenc_options(settings, Fraction(25), device_id=0)
    assert options["rc"] == "vbr" and options["cq"] == "26"
    assert options["maxbitrate"] == "3000000" and options["vbvbufsize"] == "6000000"
    assert options["gop"] == options["idrperiod"] == "120"
    assert options["fps"] == "25"
    assert options["repeatspspps"] == "1"  # parameter sets before every keyframe, as with x265


def test_presets_are_p1_to_p7_in_either_case_and_tunings_are_checked_at_start() -> None:
    assert load_settings(None, {"encode.nvenc_preset": "P7"}).encode.nvenc_preset == "p7"
    assert nvenc_options(load_settings(None, {}).encode, Fraction(30), 0)["preset"] == "P4"
    with pytest.raises(ConfigError, match="encode.nvenc_preset"):
        load_settings(None, {"encode.nvenc_preset": "slow"})
    with pytest.raises(ConfigError, match="encode.nvenc_tuning"):
        load_settings(None, {"encode.nvenc_tuning": "film"})
