"""Energy-based knowledge distillation as a timm training task.

``EnergyDistillationTask`` is a ``timm.task.TrainingTask``: ``forward(input, target)`` returns a dict with
``loss`` and ``output`` plus named terms, so it drops into timm's task-based training loop the same way
``LogitDistillationTask`` does. One step:

    teacher (no grad) -> energy E = -T_E * logsumexp(f / T_E)  (float32)
    -> thresholds (dataset calibration | per batch | running EMA)
    -> per-sample temperatures (policy) -> distillation loss (registry)
    [+ HE-DA: CutMix/MixUp of the high-energy samples, distilled as an extra term]
"""
import inspect
import logging
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from timm.task import DistillationTeacher, LogitDistillationTask
from timm.utils import unwrap_model

from .energy import EnergyThresholds, energy_score
from .thresholds import BatchQuantileThresholds, RunningThresholds
from .losses import create_distill_loss
from .mixing import HighEnergyMix, mix_targets
from .teacher import as_distillation_teacher
from .temperature import TwoBinTemperature

__all__ = ['EnergyDistillationTask']

_logger = logging.getLogger(__name__)

_THRESHOLD_MODES = ('dataset', 'batch', 'running')


# keyword arguments of timm's LogitDistillationTask that only some timm versions have (1.0.31+)
_TIMM_TASK_ARGS = set(inspect.signature(LogitDistillationTask.__init__).parameters)


class EnergyDistillationTask(LogitDistillationTask):
    """Energy-based knowledge distillation (Kim et al.) with a registry of logit losses.

    Built on timm's ``LogitDistillationTask``: teacher building, the student's normalisation buffers, the
    weighting rules, ``train()``, ``prepare_distributed`` and ``compile`` are timm's; this class adds the
    energy, thresholds, temperature policy, loss registry and HE-DA, and replaces ``forward``.

    Loss: ``task_loss_weight * criterion(student, target) + distill_loss_weight * KD
    + he_da_weight * HE-DA``, with timm's ``LogitDistillationTask`` weighting semantics: only
    ``distill_loss_weight`` set -> task weight 1.0; only ``task_loss_weight`` set -> distill weight
    ``1 - task_loss_weight``; neither -> both 1.0.

    Losses with ``uses_energy_temperature = True`` (``energy_kd``, ``energy_dkd``) get the policy's
    per-sample temperatures; others (``kd``, ``dkd``, peers) get the fixed ``temperature``. Energy
    statistics are computed for every loss so plain KD runs log them too.

    Samples whose teacher logits are not finite are masked out of the distillation terms (no host sync,
    no NaN in the loss or gradients) and counted in ``teacher_nonfinite``; the trainer should raise when it
    reads a non-zero count at its logging sync.

    HE-DA: the high-energy samples are mixed among themselves (``HighEnergyMix``); the student runs ONCE
    on ``cat([input, mixed])`` (one forward per backward, DDP safe; BatchNorm sees both parts) and the
    teacher, without grad, on the mixed images only. The HE-DA term is the same distillation loss on the
    mixed samples, with the same temperature policy as the main term (the policy applied to the mixed
    images' own teacher energies) unless ``he_da_temperature`` fixes it (the authors' code used T=4),
    with mixed targets ``lam * y_i + (1 - lam) * y_partner`` (losses needing a class take the arg-max).
    With ``selection='threshold'`` the number of mixed samples is data dependent: one host sync per step
    sizes the concatenation; ``selection='topk'`` has a static shape.

    Args:
        student_model: Student model to train.
        teacher_model: Teacher as a timm model name (built by timm with the student's num_classes / in_chans;
            a pretrained head with another class count is refused instead of silently replaced), an
            ``nn.Module`` (wrapped in ``DistillationTeacher`` with its own head), or a ``DistillationTeacher``.
            The teacher is frozen and kept in eval mode.
        criterion: Task loss (timm's default, cross-entropy, when None; use ``SoftTargetCrossEntropy`` with mixup).
        teacher_pretrained_path: Weights file for a teacher given by name.
        distill_loss: Registered loss name (``'energy_kd'``, ``'kd'``, ``'dkd'``, ``'energy_dkd'``, ...) or
            an ``nn.Module`` with the registry's ``forward(student, teacher, target, temperature)``.
        distill_loss_kwargs: Keyword arguments for a loss built by name.
        temperature: Base temperature T; used directly by losses without energy temperatures.
        temperature_policy: Module ``(energy, low, high, bin_edges) -> [B]``, used only by losses with
            ``uses_energy_temperature``; default for those ``TwoBinTemperature(temperature, 2.0, -2.0, 'paper')``.
        energy_temperature: T_E of the energy score.
        energy_rate: Threshold fraction r in (0, 0.5] for the online estimators.
        thresholds: ``EnergyThresholds`` for ``threshold_mode='dataset'`` (or call ``set_thresholds``).
        threshold_mode: ``'dataset'`` (calibrated once, the paper), ``'batch'`` (quantiles of each batch),
            ``'running'`` (EMA of batch quantiles).
        running_momentum: EMA momentum for ``'running'``.
        he_da: ``HighEnergyMix`` or None (no HE-DA).
        he_da_weight: Weight of the HE-DA term.
        distill_loss_weight: Weight of the distillation term (see weighting above).
        task_loss_weight: Weight of the task loss (see weighting above).
        device: Device for task buffers.
        dtype: Dtype for task buffers.
        verbose: Log the configuration.
        he_da_temperature: Fixed temperature for the HE-DA term (the authors' code used 4.0); None: the
            same rule as the main term (policy temperatures for energy losses, ``temperature`` otherwise).
        **timm_kwargs: Passed to timm's ``LogitDistillationTask`` (e.g. ``criterion_kwargs``,
            ``teacher_pretrained_cfg_overlay`` with timm >= 1.0.31); one this timm lacks raises ``ValueError``.
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            criterion: Optional[nn.Module] = None,
            teacher_pretrained_path: Optional[str] = None,
            distill_loss: Union[str, nn.Module] = 'energy_kd',
            distill_loss_kwargs: Optional[Dict[str, Any]] = None,
            temperature: float = 4.0,
            temperature_policy: Optional[nn.Module] = None,
            energy_temperature: float = 4.0,
            energy_rate: float = 0.2,
            thresholds: Optional[EnergyThresholds] = None,
            threshold_mode: str = 'dataset',
            running_momentum: float = 0.9,
            he_da: Optional[HighEnergyMix] = None,
            he_da_weight: float = 1.0,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            he_da_temperature: Optional[float] = None,
            **timm_kwargs,
    ):
        # validate cheap arguments before building the teacher
        if threshold_mode not in _THRESHOLD_MODES:
            raise ValueError(f"threshold_mode='{threshold_mode}' is not supported; expected one of: "
                             f"{', '.join(_THRESHOLD_MODES)}")
        if not (0.0 < energy_rate <= 0.5):
            raise ValueError(f'energy_rate={energy_rate} is out of range; expected 0 < energy_rate <= 0.5')
        if temperature <= 0:
            raise ValueError(f'temperature={temperature}; expected > 0')
        if energy_temperature <= 0:
            raise ValueError(f'energy_temperature={energy_temperature}; expected > 0')
        if he_da_temperature is not None and he_da_temperature <= 0:
            raise ValueError(f'he_da_temperature={he_da_temperature}; expected > 0 or None')
        if he_da is not None and not callable(he_da):
            raise ValueError(f'he_da must be a HighEnergyMix or None, got {type(he_da).__name__}')
        if isinstance(distill_loss, str):
            distill_loss = create_distill_loss(distill_loss, **(distill_loss_kwargs or {}))
        elif not isinstance(distill_loss, nn.Module):
            raise ValueError(
                f'distill_loss must be a registered name or an nn.Module, got {type(distill_loss).__name__}')
        if not callable(getattr(distill_loss, 'per_sample', None)):
            raise ValueError(
                f'distill_loss {type(distill_loss).__name__} has no per_sample(student_logits, teacher_logits, '
                f'target, temperature, valid=None) -> [B]; every loss needs it (see timm_energykd.losses.DistillLoss)')

        unknown = sorted(set(timm_kwargs) - _TIMM_TASK_ARGS)
        if unknown:
            import timm
            raise ValueError(f"{', '.join(unknown)}: not an argument of timm {timm.__version__}'s LogitDistillationTask")
        cfg = getattr(unwrap_model(student_model), 'pretrained_cfg', None) or {}
        if 'mean' not in cfg or 'std' not in cfg:
            raise ValueError('the student needs pretrained_cfg with mean and std (every timm model has them): '
                             "the teacher's input is re-normalised from the student's normalisation, as in timm")
        # a module teacher is wrapped here with the defaults timm's TrainingTask resolves (cpu, default dtype)
        teacher = as_distillation_teacher(teacher_model, student_model, teacher_pretrained_path,
                              device if device is not None else torch.device('cpu'),
                              dtype if dtype is not None else torch.get_default_dtype())
        super().__init__(
            student_model, teacher, criterion=criterion, teacher_pretrained_path=teacher_pretrained_path,
            distill_loss_weight=distill_loss_weight, task_loss_weight=task_loss_weight, temperature=temperature,
            device=device, dtype=dtype, verbose=verbose, **timm_kwargs)
        for p in self.teacher.parameters():
            p.requires_grad = False

        self.distill_loss = distill_loss
        self.uses_energy_temperature = bool(getattr(distill_loss, 'uses_energy_temperature', False))
        self.temperature = float(temperature)
        # only losses that use per-sample temperatures need a policy: KD+LS at T = 2 must not be refused
        # because T + T(-) = 0 would be invalid for a policy it never uses
        if temperature_policy is None and self.uses_energy_temperature:
            temperature_policy = TwoBinTemperature(temperature, 2.0, -2.0, 'paper')
        self.temperature_policy = temperature_policy
        self.num_bins = int(getattr(self.temperature_policy, 'num_bins', 10))
        self.energy_temperature = float(energy_temperature)
        self.energy_rate = float(energy_rate)
        self.threshold_mode = threshold_mode
        self.he_da = he_da
        self.he_da_weight = float(he_da_weight)
        self.he_da_temperature = he_da_temperature
        self.progress = 0.0
        # where teacher outputs come from: None = the live teacher; else a callable
        # ``source(task, input, kind) -> (logits, energy or None)`` (e.g. ``teacher_source.TeacherCacheSource``)
        self.teacher_source = None

        if threshold_mode == 'running':
            self.threshold_estimator = RunningThresholds(energy_rate, running_momentum, self.num_bins)
        elif threshold_mode == 'batch':
            self.threshold_estimator = BatchQuantileThresholds(energy_rate, self.num_bins)
        else:
            self.threshold_estimator = None
        # statistics-only fallback for 'dataset' runs of losses that do not need thresholds
        self._stats_estimator = BatchQuantileThresholds(energy_rate, self.num_bins)

        # dataset thresholds live in buffers so they follow .to(device); the dataclass goes in the task state
        self.thresholds: Optional[EnergyThresholds] = None
        self.he_da_thresholds: Optional[EnergyThresholds] = None
        self.register_buffer('thr_low', torch.zeros((), device=self.device), persistent=False)
        self.register_buffer('thr_high', torch.zeros((), device=self.device), persistent=False)
        self.register_buffer('thr_edges', torch.zeros(self.num_bins - 1, device=self.device), persistent=False)
        self.register_buffer('he_da_high', torch.zeros((), device=self.device), persistent=False)
        if thresholds is not None:
            self.set_thresholds(thresholds)

        if self.verbose:
            loss_name = getattr(distill_loss, 'loss_name', '') or type(distill_loss).__name__
            _logger.info(
                f'EnergyDistillationTask: loss={loss_name}, '
                f'T={self.temperature}, T_E={self.energy_temperature}, threshold_mode={threshold_mode}, '
                f'r={energy_rate}, policy={self.temperature_policy}, task_weight={self.task_loss_weight}, '
                f'distill_weight={self.distill_loss_weight}, he_da={he_da}')

    # ---- thresholds / schedule / state ------------------------------------------------------------------

    def set_thresholds(
            self,
            thresholds: EnergyThresholds,
            he_da_thresholds: Optional[EnergyThresholds] = None,
    ) -> None:
        """Use calibrated thresholds (``threshold_mode='dataset'``).

        ``he_da_thresholds`` optionally gives HE-DA its own ``high`` (the authors select HE-DA samples with
        r = 0.4-0.5 while the temperatures use r = 0.2); default: the main thresholds.
        """
        if abs(thresholds.energy_temperature - self.energy_temperature) > 1e-12:
            raise ValueError(
                f'thresholds were computed with energy_temperature={thresholds.energy_temperature}, '
                f'this task uses {self.energy_temperature}')
        if isinstance(self.temperature_policy, nn.Module) and hasattr(self.temperature_policy, 'num_bins') \
                and len(thresholds.bin_edges) != self.num_bins - 1:
            raise ValueError(
                f'thresholds have {len(thresholds.bin_edges)} bin edges; the temperature policy has '
                f'num_bins={self.num_bins} and needs {self.num_bins - 1} (recalibrate with num_bins={self.num_bins})')
        policy_rule = getattr(self.temperature_policy, 'rule', None)
        if policy_rule is not None and policy_rule != thresholds.rule:
            raise ValueError(
                f"thresholds were computed with rule='{thresholds.rule}' but the temperature policy compares with "
                f"rule='{policy_rule}'; use the same rule for both (paper: E <= low; authors: E < low)")
        dev = self.thr_low.device
        self.thr_low = torch.tensor(thresholds.low, dtype=torch.float32, device=dev)
        self.thr_high = torch.tensor(thresholds.high, dtype=torch.float32, device=dev)
        self.thr_edges = torch.tensor(thresholds.bin_edges, dtype=torch.float32, device=dev).reshape(-1)
        self.thresholds = thresholds
        self.he_da_thresholds = he_da_thresholds
        h = he_da_thresholds.high if he_da_thresholds is not None else thresholds.high
        self.he_da_high = torch.tensor(h, dtype=torch.float32, device=dev)

    def set_progress(self, epoch: float) -> None:
        """Training progress in (fractional) epochs; forwarded to the loss for schedules (DKD warm-up)."""
        self.progress = float(epoch)
        if hasattr(self.distill_loss, 'set_progress'):
            self.distill_loss.set_progress(epoch)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """Thresholds, online estimator buffers and progress, so a resume is exact."""
        state: Dict[str, Any] = {'threshold_mode': self.threshold_mode, 'progress': self.progress}
        if self.thresholds is not None:
            state['thresholds'] = self.thresholds.to_dict()
        if self.he_da_thresholds is not None:
            state['he_da_thresholds'] = self.he_da_thresholds.to_dict()
        if self.threshold_estimator is not None:
            est = {k: v.detach().cpu().clone() for k, v in self.threshold_estimator.state_dict().items()}
            if est:
                state['estimator'] = est
        return state

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        if not state:
            return
        if state.get('threshold_mode', self.threshold_mode) != self.threshold_mode:
            _logger.warning(
                f"checkpoint was trained with threshold_mode='{state['threshold_mode']}', "
                f"this run uses '{self.threshold_mode}'")
        if state.get('thresholds') is not None:
            he = state.get('he_da_thresholds')
            self.set_thresholds(
                EnergyThresholds.from_dict(state['thresholds']),
                EnergyThresholds.from_dict(he) if he is not None else None)
        est_state = state.get('estimator')
        if est_state is not None:
            est = self.threshold_estimator
            if est is not None and len(est.state_dict()):
                est.load_state_dict(est_state, strict=strict)
            elif strict:
                raise RuntimeError(
                    f"checkpoint has running-threshold state but this task uses threshold_mode='{self.threshold_mode}'")
        if 'progress' in state:
            self.set_progress(state['progress'])

    # ---- timm task hooks ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> 'EnergyDistillationTask':
        """Training mode with the teacher kept in eval mode: timm 1.0.31's ``train()`` does it, 1.0.29 has no
        override, so it is repeated here. ``prepare_distributed`` and ``compile`` are timm's."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ---- forward ----------------------------------------------------------------------------------------

    def teacher_logits(self, input: torch.Tensor) -> torch.Tensor:
        """No-grad teacher forward on student-normalised input (re-normalised for the teacher, as timm does)."""
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            return self.teacher(input_kd.detach(), return_features=False)

    def _teacher(self, input: torch.Tensor, kind: str):
        """(logits, energy or None) for ``input``: the live teacher, or ``teacher_source`` when set (``kind``:
        ``'main'`` for the batch, ``'mix'`` for HE-DA's mixed images). A source's energy (top-k storage keeps
        it exact) replaces the one computed from the logits."""
        if self.teacher_source is None:
            return self.teacher_logits(input), None
        return self.teacher_source(self, input, kind)

    def _thresholds(self, energy: torch.Tensor):
        if self.threshold_estimator is not None:
            low, high, edges = self.threshold_estimator(energy)
            return low, high, edges, high
        if self.thresholds is None:
            needs = self.uses_energy_temperature or (self.he_da is not None and self.he_da.selection == 'threshold')
            if needs:
                raise RuntimeError(
                    "threshold_mode='dataset' needs calibrated thresholds: pass thresholds= or call "
                    "set_thresholds(calibrate_thresholds(...)) before training")
            low, high, edges = self._stats_estimator(energy)  # statistics only
            return low, high, edges, high
        return self.thr_low, self.thr_high, self.thr_edges, self.he_da_high

    def _in_low(self, energy: torch.Tensor, low) -> torch.Tensor:
        """Low-energy group: ``E <= low`` (paper) or ``E < low`` (the authors' rule, from the policy or thresholds)."""
        rule = getattr(self.temperature_policy, 'rule', None) or getattr(self.thresholds, 'rule', 'paper')
        return energy < low if rule == 'authors' else energy <= low

    def _energy(self, teacher_logits: torch.Tensor, energy: Optional[torch.Tensor] = None):
        """(valid [B] bool, energy [B] float32); rows with non-finite logits get the energy of zero logits.
        ``energy``: a stored exact energy that replaces the one computed from the logits."""
        valid = torch.isfinite(teacher_logits).all(dim=-1)
        clean = torch.where(valid.unsqueeze(1), teacher_logits.float(), torch.zeros((), device=teacher_logits.device))
        computed = energy_score(clean, self.energy_temperature)
        if energy is None:
            return valid, computed
        return valid, torch.where(valid, energy.float(), computed)

    def _distill(self, student_logits, teacher_logits, valid, target, temperature) -> torch.Tensor:
        """Distillation loss with non-finite teacher rows masked out (mean over the valid rows)."""
        # replacing bad rows BEFORE the loss keeps NaN/Inf out of the graph (torch.where alone would still
        # back-propagate 0 * NaN); losses with batch terms leave the masked rows out of them (``valid``)
        t_safe = torch.where(valid.unsqueeze(1), teacher_logits.float(), student_logits.detach().float())
        loss = self.distill_loss.per_sample(student_logits, t_safe, target, temperature, valid=valid)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return loss.sum() / valid.sum().clamp(min=1)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward pass with energy-based distillation.

        Returns:
            Dict of 0-d tensors (no host sync): ``loss``, ``task_loss``, ``kd_loss``, ``energy_mean``,
            ``frac_low``, ``frac_high``, ``temp_mean``, ``teacher_nonfinite`` (float count), plus
            ``he_da_loss`` / ``he_da_frac`` with HE-DA; and ``output``, the student logits on the
            original batch [B, C].
        """
        b = input.shape[0]
        t_logits, t_energy = self._teacher(input, 'main')
        valid, energy = self._energy(t_logits, t_energy)
        low, high, edges, he_high = self._thresholds(energy)
        if self.uses_energy_temperature:
            temps = kd_temperature = self.temperature_policy(energy, low, high, edges)
        else:
            temps, kd_temperature = torch.full_like(energy, self.temperature), self.temperature

        mix = self.he_da(input, energy, he_high) if self.he_da is not None else None
        if mix is not None and mix.num_mixed > 0:
            logits_all = self.trainable_module(torch.cat([input, mix.mixed.to(input.dtype)]))
            student_logits, student_mixed = logits_all[:b], logits_all[b:]
        else:
            student_logits = self.trainable_module(input)
            student_mixed = None

        task_loss = self.criterion(student_logits, target)
        kd_loss = self._distill(student_logits, t_logits, valid, target, kd_temperature)
        total = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss

        nonfinite = (~valid).sum().float()
        out: Dict[str, torch.Tensor] = {}
        if mix is not None:
            if student_mixed is not None:
                t_mix, t_energy_mix = self._teacher(mix.mixed, 'mix')
                valid_mix, energy_mix = self._energy(t_mix, t_energy_mix)
                nonfinite = nonfinite + (~valid_mix).sum().float()
                if self.he_da_temperature is not None:
                    he_temperature = self.he_da_temperature
                elif self.uses_energy_temperature:
                    he_temperature = self.temperature_policy(energy_mix, low, high, edges)
                else:
                    he_temperature = self.temperature
                mixed_target = mix_targets(
                    target.index_select(0, mix.index), target.index_select(0, mix.partner), mix.lam,
                    student_logits.shape[-1])
                he_da_loss = self._distill(student_mixed, t_mix, valid_mix, mixed_target, he_temperature)
            else:
                he_da_loss = torch.zeros((), dtype=torch.float32, device=student_logits.device)
            total = total + self.he_da_weight * he_da_loss
            out['he_da_loss'] = he_da_loss
            out['he_da_frac'] = mix.fraction

        with torch.no_grad():
            vf = valid.float()
            n_valid = vf.sum().clamp(min=1)
            out.update(
                energy_mean=(energy * vf).sum() / n_valid,
                frac_low=(self._in_low(energy, low).float() * vf).sum() / n_valid,
                frac_high=((energy > high).float() * vf).sum() / n_valid,
                temp_mean=(temps * vf).sum() / n_valid,
                teacher_nonfinite=nonfinite,
            )
        return {'loss': total, 'output': student_logits, 'task_loss': task_loss, 'kd_loss': kd_loss, **out}
