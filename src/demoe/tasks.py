"""The blur types DeMoE knows, in expert order (no heavy imports)."""

#: Task names in expert order: ``TASKS[i]`` is handled by expert ``i``.
TASKS: tuple[str, ...] = (
    "defocus",
    "global_motion",
    "local_motion",
    "synth_global_motion",
    "low_light",
)

#: Readable names for user interfaces.
TASK_LABELS: dict[str, str] = {
    "defocus": "Defocus",
    "global_motion": "Camera shake",
    "local_motion": "Moving objects",
    "synth_global_motion": "Fast motion (GoPro-like)",
    "low_light": "Low light",
}
