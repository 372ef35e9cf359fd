"""The class list: the single place that fixes label order, folder names and prompt order."""

CLASSES: tuple[str, ...] = ("NORMAL", "BACTERIA", "VIRUS")
CLASS_TO_INDEX: dict[str, int] = {name: index for index, name in enumerate(CLASSES)}


def class_index(label: str) -> int:
    try:
        return CLASS_TO_INDEX[label]
    except KeyError:
        raise ValueError(f"unknown class label {label!r}; expected one of {', '.join(CLASSES)}") from None
