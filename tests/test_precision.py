"""bf16 on a CPU that would emulate it: the run trains in fp32 and says so, unless asked to keep bf16."""

from __future__ import annotations

import pytest

import cots.precision
from cots.precision import fall_back_from_emulated_bf16
from cots.train import train


@pytest.fixture
def emulated_bf16(monkeypatch):
    monkeypatch.setattr(cots.precision, "native_cpu_bf16", lambda: False)


def test_a_bf16_run_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(make_cfg, emulated_bf16):
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu", "trainer.max_steps=1", "test=false")
    with pytest.warns(UserWarning, match=r"trainer.precision=bf16-mixed on a CPU without native bf16.*32-true"):
        _, objects = train(cfg)
    assert objects["trainer"].precision == "32-true"
    assert objects["trainer"].global_step == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("trainer.precision=bf16-mixed", "cpu_bf16_fallback=false"), "bf16-mixed"),  # asked to keep it
        (("trainer.precision=32-true",), "32-true"),  # nothing to change
        (("trainer.precision=bf16-true",), "32-true"),
        (("trainer.precision=bf16-mixed", "trainer.accelerator=gpu"), "bf16-mixed"),  # not a CPU run
    ],
)
def test_the_fallback_changes_only_bf16_on_a_cpu_that_emulates_it(make_cfg, emulated_bf16, overrides, expected):
    cfg = make_cfg(*overrides)
    fall_back_from_emulated_bf16(cfg)
    assert cfg.trainer.precision == expected


def test_a_cpu_with_native_bf16_keeps_it(make_cfg, monkeypatch):
    monkeypatch.setattr(cots.precision, "native_cpu_bf16", lambda: True)
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu")
    assert fall_back_from_emulated_bf16(cfg) is None and cfg.trainer.precision == "bf16-mixed"
