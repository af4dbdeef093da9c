"""Per-runner presets: turn a runner name into Beam command-line arguments.

    from runners import preset_args
    argv = preset_args("flink", parallelism=4) + user_argv

Each preset module (direct, prism, flink, dataflow) exposes
``preset_args(**overrides) -> list[str]``. Overrides use Beam's option names
without the leading dashes; ``None`` removes a preset option, ``True`` renders a
bare flag, ``False`` drops a flag, a list or tuple renders one ``--name=value``
per item. Arguments given later on the command line win over the preset
(argparse keeps the last value), so ``preset_args(...) + sys.argv[1:]`` lets a
user override anything.

This package never imports from ``pipeline/`` or ``transforms/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

OptionValue = str | int | float | bool | list[str] | tuple[str, ...] | None

# Accepted spellings of each runner: "flink", "FlinkRunner", "flinkrunner".
RUNNER_NAMES: dict[str, str] = {
    "direct": "direct",
    "directrunner": "direct",
    "prism": "prism",
    "prismrunner": "prism",
    "flink": "flink",
    "flinkrunner": "flink",
    "dataflow": "dataflow",
    "dataflowrunner": "dataflow",
}


def normalize_runner(runner: str) -> str:
    """Map a runner name (any case, with or without 'Runner') to a preset key."""
    key = runner.strip().lower()
    if key not in RUNNER_NAMES:
        known = ", ".join(sorted({v for v in RUNNER_NAMES.values()}))
        raise ValueError(f"unknown runner {runner!r}; known: {known}")
    return RUNNER_NAMES[key]


def render_args(
    defaults: Mapping[str, OptionValue], overrides: Mapping[str, object]
) -> list[str]:
    """Merge ``overrides`` into ``defaults`` and render ``--name=value`` args."""
    merged: dict[str, object] = dict(defaults)
    merged.update(overrides)
    args: list[str] = []
    for name, value in merged.items():
        flag = "--" + name.lstrip("-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            args.extend(f"{flag}={item}" for item in value)
        else:
            args.append(f"{flag}={value}")
    return args


def preset_args(runner: str, /, **overrides: object) -> list[str]:
    """Return the Beam command-line args of ``runner``'s preset, with overrides."""
    from runners import dataflow, direct, flink, prism

    presets: dict[str, Callable[..., list[str]]] = {
        "direct": direct.preset_args,
        "prism": prism.preset_args,
        "flink": flink.preset_args,
        "dataflow": dataflow.preset_args,
    }
    return presets[normalize_runner(runner)](**overrides)


__all__ = [
    "RUNNER_NAMES",
    "OptionValue",
    "normalize_runner",
    "preset_args",
    "render_args",
]
