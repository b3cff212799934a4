"""Imports every architecture module so that their builders register themselves in the registry."""

from models import densenet, mobilenetv2, resnet_cifar, smallnet, wrn  # noqa: F401
