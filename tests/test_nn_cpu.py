"""CPU capability detection and the emulated-bf16 warning."""

import logging
import platform

import pytest

from nowcast.nn import cpu
from nowcast.train import train


def test_reads_this_cpu():
    caps = cpu.cpu_capabilities()
    assert caps.model and caps.torch_capability
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert caps.flags and ("sse2" in caps.flags)
    assert caps.model in caps.summary()


@pytest.mark.parametrize("flags, native", [
    ({"avx2"}, False),
    ({"avx2", "avx512f"}, False),
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "amx_bf16", "amx_tile"}, True),
])
def test_native_bf16_needs_the_bf16_extensions(monkeypatch, flags, native):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    caps = cpu.CpuCapabilities("x", frozenset(flags), "AVX2")
    assert caps.native_bf16 is native


def test_warning_only_for_bf16_where_it_is_emulated(monkeypatch):
    monkeypatch.setattr(cpu, "bf16_is_native", lambda: False)
    assert "SLOWER" in cpu.emulated_bf16_warning("bf16-mixed")
    assert cpu.emulated_bf16_warning("32-true") is None
    monkeypatch.setattr(cpu, "bf16_is_native", lambda: True)
    assert cpu.emulated_bf16_warning("bf16-mixed") is None


class _Warned(Exception):
    pass


def test_training_in_bf16_on_an_emulating_cpu_warns_before_any_step(train_cfg, monkeypatch, caplog):
    import nowcast.lit_module

    monkeypatch.setattr(cpu, "bf16_is_native", lambda: False)

    def stop(message):  # stop the run at the warning: no slow emulated-bf16 step needed
        raise _Warned(message)

    monkeypatch.setattr(nowcast.lit_module, "rank_zero_warn", stop)
    cfg = train_cfg("++trainer.fast_dev_run=true", "trainer.precision=bf16-mixed")
    with caplog.at_level(logging.WARNING, logger="nowcast.lit_module"), \
            pytest.raises(_Warned, match="emulates bf16.*32-true"):
        train(cfg)
    assert any("emulates bf16" in r.getMessage() for r in caplog.records)
