"""The blur types DeMoE knows, in expert order, and the choices the interfaces share (no heavy imports)."""

#: Task names in expert order: ``TASKS[i]`` is handled by expert ``i``.
TASKS: tuple[str, ...] = (
    "defocus",
    "global_motion",
    "local_motion",
    "synth_global_motion",
    "low_light",
)


def task_index(task: str, tasks: tuple[str, ...] = TASKS, auto: bool = False) -> int:
    """Index of ``task`` in ``tasks``; ValueError naming the valid ones otherwise.

    ``auto=True`` lists "auto" among them (for callers that accept automatic routing
    and have handled it before asking).
    """
    if task not in tasks:
        valid = ", ".join(["auto", *tasks] if auto else tasks)
        raise ValueError(f"unknown task {task!r}; valid tasks are: {valid}")
    return tasks.index(task)


#: Readable names for user interfaces.
TASK_LABELS: dict[str, str] = {
    "defocus": "Defocus",
    "global_motion": "Camera shake",
    "local_motion": "Moving objects",
    "synth_global_motion": "Fast motion (GoPro-like)",
    "low_light": "Low light",
}

#: Sizes of ``deblur``'s geometric self-ensemble: the identity, then a left-right flip,
#: all four flips, and the four flips of the transpose.
ENSEMBLES: tuple[int, ...] = (1, 2, 4, 8)
