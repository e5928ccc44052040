"""Task distributions."""

from tfmeta.tasks.base import FiniteTasks, TaskDistribution, finite_tasks
from tfmeta.tasks.continual_sine import ContinualSineTasks
from tfmeta.tasks.families import MixtureFamilies, SineFamilies, TaskFamilies, goal_tasks
from tfmeta.tasks.sine import SineLineTasks, SineTasks
from tfmeta.tasks.surfaces import SurfaceTasks, surface_loss

__all__ = ["ContinualSineTasks", "FiniteTasks", "finite_tasks",
           "MixtureFamilies", "SineFamilies", "SineLineTasks", "SineTasks", "SurfaceTasks", "TaskDistribution",
           "TaskFamilies", "goal_tasks", "surface_loss"]
