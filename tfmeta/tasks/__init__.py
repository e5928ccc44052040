"""Task distributions."""

from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks.continual_sine import ContinualSineTasks
from tfmeta.tasks.sine import SineTasks
from tfmeta.tasks.surfaces import SurfaceTasks, surface_loss

__all__ = ["ContinualSineTasks", "SineTasks", "SurfaceTasks", "TaskDistribution", "surface_loss"]
