"""Each CPU redirection of ``c2f_megatron.platform.megatron_cpu`` is needed: its megatron code path runs
with all redirections and fails when only that one is left out (fresh process per case)."""

from __future__ import annotations

import json

import pytest

from c2f_megatron.platform.megatron_cpu import CPU_REDIRECTS, LocalDeviceTorch, WallClockEvent
from c2f_megatron.platform.patching import rewrite_function
from tests.launch import run_python


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, str]]:
    return json.loads(run_python("redirect_probe.py", []).strip().splitlines()[-1])


def test_all_paths_work_with_redirections(probes):
    assert probes["all"] == {name: "ok" for name in CPU_REDIRECTS}


@pytest.mark.parametrize("name", list(CPU_REDIRECTS))
def test_path_fails_without_its_redirection(probes, name):
    result = probes[f"without:{name}"][name]
    assert result != "ok", f"{name}: megatron path worked without the redirection; it is not needed"


def test_local_device_torch_maps_cuda_to_cpu():
    proxy = LocalDeviceTorch()
    t = proxy.zeros(2, device="cuda", pin_memory=True)
    assert t.device.type == "cpu"
    assert proxy.float32 is __import__("torch").float32


def test_wall_clock_event_measures_time():
    a, b = WallClockEvent(enable_timing=True), WallClockEvent(enable_timing=True)
    with pytest.raises(RuntimeError):
        a.elapsed_time(b)
    a.record()
    b.record()
    assert b.elapsed_time(a) <= 0.0 <= a.elapsed_time(b)


def test_rewrite_refuses_unexpected_source():
    class Holder:
        @staticmethod
        def f():
            return "a"

    with pytest.raises(RuntimeError, match="expected text"):
        rewrite_function(Holder, "f", {"not there": "x"})
    assert Holder.f() == "a"
    rewrite_function(Holder, "f", {'"a"': '"b"'})
    assert Holder.f() == "b"
