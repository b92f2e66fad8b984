"""dtype auto: bfloat16 only where this device computes it natively (chatuie.models.precision)."""

from __future__ import annotations

import logging

import pytest
import torch

from chatuie.models import precision
from chatuie.models.precision import ComputeDevice, cpu_device, resolve_autocast, resolve_dtype

AVX2 = {"avx2": True, "architecture": "x86_64"}
AVX512 = {**AVX2, "avx512_f": True, "avx512_bw": True}
AVX512_BF16 = {**AVX512, "avx512_bf16": True}
AMX = {**AVX512_BF16, "amx_tile": True, "amx_bf16": True}
CUDA_BF16 = ComputeDevice("cuda", "NVIDIA H100", True, "supports bfloat16")
CUDA_OLD = ComputeDevice("cuda", "Tesla V100", False, "lacks bfloat16")


@pytest.mark.parametrize(
    ("capabilities", "label", "native"),
    [
        (AMX, "AMX-BF16", True),
        (AVX512_BF16, "AVX-512 BF16", True),
        (AVX512, "AVX-512", False),
        (AVX2, "AVX2", False),
        ({"architecture": "aarch64"}, "aarch64", False),
    ],
)
def test_cpu_class_and_native_bfloat16(capabilities, label, native):
    device = cpu_device(capabilities, env={})
    assert (device.label, device.native_bf16) == (label, native)
    assert resolve_dtype("auto", device) == ("bfloat16" if native else "float32")
    assert resolve_autocast("auto", device, where="rm.train.bf16") is native


@pytest.mark.parametrize(("device", "expected"), [(CUDA_BF16, "bfloat16"), (CUDA_OLD, "float32")])
def test_cuda_follows_its_bfloat16_support(device, expected):
    assert resolve_dtype("auto", device) == expected


@pytest.mark.parametrize(
    "env",
    [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, {"ATEN_CPU_CAPABILITY": "avx2"}],
)
def test_an_isa_limit_makes_a_bf16_cpu_resolve_as_avx2(env):
    device = cpu_device(AMX, env=env)
    assert not device.native_bf16 and "limited to" in device.label
    assert resolve_dtype("auto", device) == "float32"


def test_an_isa_limit_that_keeps_bf16_changes_nothing():
    assert cpu_device(AMX, env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).native_bf16
    assert cpu_device(AVX512_BF16, env={"ATEN_CPU_CAPABILITY": "avx512"}).native_bf16


def test_an_explicit_choice_is_kept_and_emulated_bfloat16_warns_once(caplog):
    avx2 = cpu_device(AVX2, env={})
    precision._warned.clear()
    with caplog.at_level(logging.WARNING, logger="chatuie.models.precision"):
        assert resolve_dtype("bfloat16", avx2, where="model.dtype") == "bfloat16"
        assert resolve_dtype("bfloat16", avx2, where="model.dtype") == "bfloat16"
        assert resolve_dtype("float32", cpu_device(AMX, env={}), where="model.dtype") == "float32"
        assert resolve_dtype("bfloat16", cpu_device(AMX, env={}), where="model.dtype") == "bfloat16"
        assert resolve_autocast(False, avx2, where="rm.train.bf16") is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "model.dtype" in warnings[0] and "55x slower" in warnings[0] and "AVX2" in warnings[0]


def test_unknown_values_name_the_setting():
    with pytest.raises(ValueError, match=r"evaluate.settings.dtype: unknown dtype 'bf16'"):
        resolve_dtype("bf16", cpu_device(AVX2, env={}), where="evaluate.settings.dtype")
    with pytest.raises(ValueError, match=r"rm.train.bf16: expected true, false or auto"):
        resolve_autocast("yes", cpu_device(AVX2, env={}), where="rm.train.bf16")


def test_this_machine_resolves_consistently_with_what_torch_reports():
    device = precision.current_device("cpu")
    caps = torch.cpu.get_capabilities()
    native = bool(caps.get("avx512_bf16") or (caps.get("amx_bf16") and caps.get("amx_tile")))
    assert device.native_bf16 is (native and device.label in ("AMX-BF16", "AVX-512 BF16"))
    assert precision.lineage("auto", resolve_dtype("auto", device), device)["device"].startswith("CPU ")
