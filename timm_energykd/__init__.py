"""timm-energykd: energy-based knowledge distillation for timm.

Importing the package registers its model architectures in timm's registry and its distillation losses
(the paper's and the peers') in the loss registry, so `timm.create_model('cifar_resnet8x4')` and
`create_distill_loss('energy_kd')` work after `import timm_energykd`. The Hub release path is
`timm_energykd.hub` (imported on use; `python -m timm_energykd.hub export|push`).
"""
__version__ = '0.1.0'

from .losses import (
    DistillLoss, register_distill_loss, create_distill_loss, list_distill_losses, is_distill_loss,
    uses_energy_temperature, loss_options, loss_kwargs_from_args,
    kd_loss_per_sample, dkd_loss_per_sample, dkd_warmup_factor, KDLoss, EnergyKDLoss, DKDLoss, EnergyDKDLoss,
)
from .energy import (
    energy_score, threshold_indices, EnergyThresholds, calibrate_thresholds,
)
from .thresholds import BatchQuantileThresholds, RunningThresholds
from .calibration import Calibration, calibrate_or_load
from .temperature import TwoBinTemperature, GradedTemperature, create_temperature_policy
from .mixing import HighEnergyMix, MixResult
from .task import EnergyDistillationTask
from . import models
from .data import long_tailed_indices, TransformSubset, create_train_eval_datasets
from .teacher import build_teacher, BlendedTeacher, make_pruned_teacher
from .files import write_atomic, save_checkpoint_atomic, load_checkpoint_file
from .plots import plot_energy_histogram
