"""Registers tfmeta's and Keras' building blocks with gin. Import before parsing gin files.

Keras layers and models are registered with `gin.external_configurable` (decorating a Keras 3 `Layer`
subclass with `@gin.configurable` breaks its construction), so gin files write e.g. `MAML.inner_steps = 5`.
"""

import gin
import keras

import tfmeta
from tfmeta import experiment  # noqa: F401  (registers Experiment)
from tfmeta.optimizers import experiment as _optimizer_experiment  # noqa: F401  (registers OptimizerExperiment)

# Meta-learners, update rules and metric learners register themselves (`tfmeta.register`); Partition is no Keras
# object.
gin.external_configurable(tfmeta.Partition, module="tfmeta")
for _fn in (tfmeta.models.mlp, tfmeta.models.conv_net, tfmeta.models.point_model, tfmeta.warp.insert_warps):
    gin.external_configurable(_fn, module="tfmeta.models")
gin.external_configurable(tfmeta.metric.relation_module, module="tfmeta.metric")
for _warp in (tfmeta.warp.WarpConv2D, tfmeta.warp.WarpDense, tfmeta.warp.WarpScale, tfmeta.warp.WarpConvBlock,
              tfmeta.warp.ResidualWarp, tfmeta.warp.FiLM, tfmeta.warp.WarpRNNCell):
    gin.external_configurable(_warp, module="tfmeta.warp")
for _data in (tfmeta.data.omniglot_tasks, tfmeta.data.FewShotTasks, tfmeta.data.RandomAffine,
              tfmeta.data.omniglot_alphabet_tasks, tfmeta.data.GroupTasks, tfmeta.data.omniglot_families,
              tfmeta.data.AffineFamilies):
    gin.external_configurable(_data, module="tfmeta.data")
for _tasks in (tfmeta.tasks.SineTasks, tfmeta.tasks.SineLineTasks, tfmeta.tasks.SurfaceTasks, tfmeta.tasks.surface_loss,
               tfmeta.tasks.ContinualSineTasks, tfmeta.tasks.SineFamilies, tfmeta.tasks.MixtureFamilies,
               tfmeta.tasks.goal_tasks, tfmeta.tasks.finite_tasks):
    gin.external_configurable(_tasks, module="tfmeta.tasks")
for _optimizer in (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD, keras.optimizers.RMSprop):
    gin.external_configurable(_optimizer, module="keras.optimizers")
for _schedule in (keras.optimizers.schedules.CosineDecay, keras.optimizers.schedules.PolynomialDecay,
                  keras.optimizers.schedules.ExponentialDecay):
    gin.external_configurable(_schedule, module="keras.optimizers.schedules")
