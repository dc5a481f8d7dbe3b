"""Distillation losses: the registry (``registry.py``) and one method per file.

    kd.py     kd, energy_kd                 Hinton KD / Energy KD (Kim et al.)
    dkd.py    dkd, energy_dkd               Decoupled KD with mdistiller's warm-up / Energy DKD
    ls.py     kd_ls, energy_kd_ls, dkd_ls   logit standardisation (Sun et al., CVPR 2024), built on kd / dkd
    wttm.py   wttm, energy_wttm             weighted transformed teacher matching (Zheng & Yang, ICLR 2024)
    r2kd.py   r2kd, energy_r2kd             correlation-distance KD (Kim et al., TKDE 2024)
    rekd.py   rekd, energy_rekd             Top-K split of KD (after Xu et al., TCSVT 2023; our reading)
    cskd.py   cskd                          cosine similarity KD with CSWT (Ham et al.)

Each ``energy_*`` name builds the same class as its method with ``temperature_source='energy'``.
"""
from .registry import (
    DistillLoss, LossEntry, TEMPERATURE_SOURCES, as_sample_temperature, create_distill_loss, get_loss_entry,
    hard_target, is_distill_loss, list_distill_losses, loss_entries, loss_kwargs_from_args, loss_options, masked_mean,
    register_distill_loss, uses_energy_temperature, valid_weights,
)
from .kd import EnergyKDLoss, KDLoss, kd_loss_per_sample
from .dkd import WARMUP_MODES, DKDLoss, EnergyDKDLoss, dkd_loss_per_sample, dkd_warmup_factor
from .ls import DKDLS, KDLS, standardize_logits
from .wttm import WTTM, wttm_loss_per_sample
from .r2kd import R2KD, r2kd_loss, r2kd_loss_per_sample
from .rekd import ReKD, rekd_loss_per_sample
from .cskd import CSKD, cskd_loss, cskd_loss_per_sample, cswt_temperature

# read-only view for timm_energykd/hub.py, which still looks entries up by this name (name -> LossEntry,
# each with ``uses_energy_temperature``); new code should call ``uses_energy_temperature(name)``
_DISTILL_LOSSES = loss_entries()
