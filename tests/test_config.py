from __future__ import annotations

import pytest

from hlasync import ConfigError, SandboxConfig


def test_defaults_are_valid() -> None:
    config = SandboxConfig()
    assert config.memory_size == 8 << 20
    assert config.crashdump_enabled is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_size": 1 << 20},
        {"memory_size": 512 << 20},
        {"memory_size": (8 << 20) + 1},
        {"memory_size": "8M"},
        {"stack_size": 4096},
        {"stack_size": 0},
        {"input_buffer_size": -4096},
        {"output_buffer_size": 1024},
        {"heap_size": 100},
        {"crashdump_enabled": "yes"},
        {"crashdump_dir": 5},
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(**kwargs)  # type: ignore[arg-type]
    assert next(iter(kwargs)) in str(info.value) or "buffers" in str(info.value)
    assert isinstance(info.value, ValueError)
