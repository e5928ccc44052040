"""Task distributions."""

from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks.sine import SineTasks

__all__ = ["SineTasks", "TaskDistribution"]
