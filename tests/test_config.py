from __future__ import annotations

import dataclasses

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


def test_docstring_states_every_field_and_limit() -> None:
    doc = SandboxConfig.__doc__ or ""
    for field in dataclasses.fields(SandboxConfig):
        assert f"``{field.name}``" in doc, field.name
    for limit in ("2 MiB to 256 MiB", "at least 8 KiB", "at least 4 KiB", "multiples of 4 KiB"):
        assert limit in " ".join(doc.split()), limit
    assert "at most 3600" in doc


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_size": 2 << 20},
        {"memory_size": 256 << 20},
        {"stack_size": 8 << 10},
        {"input_buffer_size": 4 << 10, "output_buffer_size": 4 << 10},
        {"heap_size": 4 << 10},
        {"init_timeout": 3600},
        {"idle_trim": 86400},
        {"idle_trim": None},
        # stack + buffers exactly fill what 2 MiB leaves above the smallest image
        {"memory_size": 2 << 20, "stack_size": (1 << 20) - (8 << 10) - (512 << 10)},
    ],
)
def test_limits_are_inclusive(kwargs: dict[str, object]) -> None:
    SandboxConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_size": 1 << 20}, "memory_size must be between 2 MiB and 256 MiB, got 1,048,576"),
        ({"memory_size": 512 << 20}, "between 2 MiB and 256 MiB, got 536,870,912 (512 MiB)"),
        ({"stack_size": 4096}, "stack_size must be at least 8 KiB, got 4,096"),
        ({"output_buffer_size": 1024}, "output_buffer_size must be a multiple of 4096"),
        ({"input_buffer_size": 0}, "input_buffer_size must be at least 4 KiB, got 0"),
        ({"init_timeout": 0}, "init_timeout must be a number of seconds in (0, 3600], got 0"),
        ({"crashdump_enabled": 1}, "crashdump_enabled must be a bool, got int"),
        ({"crashdump_dir": 5}, "crashdump_dir must be a path or None, got int"),
        ({"idle_trim": 0}, "idle_trim must be a number of seconds in (0, 86400] or None, got 0"),
    ],
)
def test_messages_name_the_limit_and_the_value_given(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_size": 2 << 20, "stack_size": 1 << 20},
        {"memory_size": 2 << 20, "input_buffer_size": 1 << 20},
        {"memory_size": 8 << 20, "heap_size": 8 << 20},
    ],
)
def test_sizes_that_cannot_fit_in_memory_are_refused_at_construction(
    kwargs: dict[str, object],
) -> None:
    # Before, such a config was accepted and every Sandbox made with it failed.
    with pytest.raises(ConfigError, match=r"more than .* that memory_size .* raise memory_size"):
        SandboxConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1, 0.0, 86401, True, "2", float("nan")])
def test_bad_idle_trim_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="idle_trim"):
        SandboxConfig(idle_trim=value)  # type: ignore[arg-type]
