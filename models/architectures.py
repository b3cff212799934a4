"""Imports every architecture module so that their builders register themselves."""

from models import resnet_cifar, smallnet  # noqa: F401

# Modules added by later work register here too (kept in one place so the registry stays complete).
for _optional in ("mobilenetv2", "densenet", "wrn"):
    try:
        __import__(f"models.{_optional}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a family is not written yet
        if _exc.name != f"models.{_optional}":
            raise
