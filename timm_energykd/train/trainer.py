#!/usr/bin/env python3
"""Train an image classifier with energy-based knowledge distillation (timm-style trainer).

    python train_energykd.py DATA_DIR --teacher resnet50 --teacher-checkpoint t.pth.tar \
        --model mobilenetv1_100 --energy-rate 0.3
    python train_energykd.py DATA_DIR --model cifar_resnet32x4 ...      # no --teacher: plain training
    python train_energykd.py --demo                                     # offline demo, ~3 min on CPU

Same flags, ``--config`` YAML and output folder (``args.yaml``, ``summary.csv``, ``last.pth.tar``,
``model_best.pth.tar``) as timm's ``train.py``; see docs/TRAINING.md and docs/FLAGS.md.
Flow: parse -> validate -> build (data, student, teacher, task, optimizer) -> calibrate -> epoch loop.
"""
import hashlib
import logging
import os
import pickle
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import timm
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, CheckpointSaver, NativeScaler, accuracy, dispatch_clip_grad, distribute_bn, get_outdir,
    init_distributed_device, random_seed, reduce_tensor, setup_default_logging, update_summary,
)
from timm.utils.model import unwrap_model

import timm_energykd  # noqa: F401  (registers models and losses)
from .args import parse_args, validate_args
from timm_energykd.data import TransformSubset, create_train_eval_datasets, dataset_num_classes
from timm_energykd.files import check_image_files, check_writable_dir, load_checkpoint_file, write_atomic
from timm_energykd.teacher import BlendedTeacher
from timm_energykd.teacher import build_teacher, resolve_teacher_pretrained

_logger = logging.getLogger('train')

# Per-step terms the distillation task returns as 0-d tensors (averaged per epoch into summary.csv).
_TERMS = ('loss', 'task_loss', 'kd_loss', 'he_da_loss', 'he_da_frac', 'energy_mean', 'frac_low', 'frac_high',
          'temp_mean')


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver writes ``last`` via a temp file, but unlinks the old ``last`` before the rename,
    and the copy to ``model_best`` / ``checkpoint-N`` unlinks then links (or copies) in place. Here every
    file appears through a temp name and one ``os.replace``, so a kill at any moment leaves each checkpoint
    either the previous complete version or the new complete one."""

    def _replace(self, src, dst):
        if os.name == 'nt':
            return super()._replace(src, dst)
        # timm unlinks ``last`` before the rename, so a kill in between would leave no last checkpoint;
        # os.replace alone is atomic on POSIX (a hard-linked checkpoint-N keeps its own inode)
        os.replace(src, dst)

    def _duplicate(self, src, dst):
        tmp = dst + '.tmp-dup'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            import shutil
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------------------------
# build helpers
# ------------------------------------------------------------------------------------------------------------

def _check_trainer_args(args) -> None:
    """Trainer-specific checks (fast, before anything is built); one-line ValueError."""
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {args.amp_dtype!r}")
    if getattr(args, 'grad_accum_steps', 1) < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.batch_size < 1:
        raise ValueError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {args.epochs}')
    if args.teacher is None and (args.teacher_checkpoint or args.teacher_pretrained):
        raise ValueError('--teacher-checkpoint / --teacher-pretrained need --teacher NAME')
    if args.teacher is not None and args.he_da != 'off' and args.distill_loss is None:
        raise ValueError('--he-da needs a distillation loss (--distill-loss)')
    if not timm.is_model(args.model) and not str(args.model).startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f"--model: '{args.model}' is not a timm model name (see timm.list_models())")
    if args.teacher is not None and not timm.is_model(args.teacher) \
            and not str(args.teacher).startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f"--teacher: '{args.teacher}' is not a timm model name (see timm.list_models())")
    check_writable_dir(args.output or './output/train', '--output')


# Up to this many train/val images get their header checked at startup (~1 s for 50k on a local disk); larger
# sets rely on timm's dataset, which skips an unreadable image with a warning and stops after repeated failures.
_MAX_IMAGES_CHECKED = 50_000


def _image_paths(dataset) -> Optional[List[str]]:
    """File paths of a timm folder dataset (None for other kinds, e.g. torchvision CIFAR or streaming)."""
    indices = None
    if isinstance(dataset, TransformSubset):
        dataset, indices = dataset.dataset, dataset.indices
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if samples is None:
        return None
    paths = [s[0] for s in samples]
    return paths if indices is None else [paths[i] for i in indices]


def _check_images(dataset, flag: str = '--data-dir') -> None:
    """Unreadable images fail here, with the file named, instead of hours into calibration or training."""
    paths = _image_paths(dataset)
    if paths is None:
        return
    if len(paths) > _MAX_IMAGES_CHECKED:
        _logger.info(f'{len(paths)} images: skipping the startup image check (limit {_MAX_IMAGES_CHECKED}); '
                     f'unreadable images are skipped with a warning during training')
        return
    check_image_files(paths, flag)


def _check_resume_matches(args, ckpt) -> None:
    """--resume must continue the same distillation: same teacher (name and weights) and loss."""
    old = ckpt.get('args')
    if old is not None:
        old_teacher = getattr(old, 'teacher', None) or getattr(old, 'kd_model_name', None)
        new_teacher = args.teacher or getattr(args, 'kd_model_name', None)
        old_loss = getattr(old, 'distill_loss', None) if old_teacher is not None else None
        new_loss = args.distill_loss if new_teacher is not None else None
        if old_teacher != new_teacher:
            raise ValueError(f'--resume: {args.resume} was trained with --teacher {old_teacher}, this run has '
                             f'--teacher {new_teacher}; resume with the same teacher or start a new run')
        old_blend = (getattr(old, 'teacher_prune_amount', 0.0), getattr(old, 'teacher_blend_weight', 0.7))
        new_blend = (args.teacher_prune_amount, args.teacher_blend_weight)
        if old_teacher is not None and old_blend[0] + new_blend[0] > 0 and old_blend != new_blend:
            raise ValueError(f'--resume: {args.resume} was trained with --teacher-prune-amount {old_blend[0]} '
                             f'--teacher-blend-weight {old_blend[1]}, this run has {new_blend[0]} / {new_blend[1]}; '
                             'resume with the same teacher blend or start a new run')
        if old_loss != new_loss:
            raise ValueError(f'--resume: {args.resume} was trained with --distill-loss {old_loss}, this run has '
                             f'--distill-loss {new_loss}; resume with the same loss or start a new run')
    identity = ((ckpt.get('task_state') or {}).get('thresholds') or {}).get('identity') or {}
    old_sha = identity.get('teacher_checkpoint_sha256')
    if old_sha is not None and args.teacher_checkpoint and _sha256(args.teacher_checkpoint) != old_sha:
        raise ValueError(f'--resume: {args.resume} was distilled from other teacher weights than '
                         f'--teacher-checkpoint {args.teacher_checkpoint} (sha256 differs)')


def _resolve_device(args) -> torch.device:
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        _logger.warning('CUDA is not available, training on CPU (pass --device cpu to silence this)')
        args.device = 'cpu'
    return init_distributed_device(args)


def _sha256(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _create_criterion(args, mixup_active: bool) -> nn.Module:
    if args.bce_loss:
        return BinaryCrossEntropy(
            smoothing=args.smoothing, target_threshold=args.bce_target_thresh,
            sum_classes=getattr(args, 'bce_sum', False), pos_weight=getattr(args, 'bce_pos_weight', None))
    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is applied by the mixup targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def _create_task(args, model, teacher, criterion, device):
    """EnergyDistillationTask with a teacher, else timm's ClassificationTask (plain training)."""
    if teacher is None:
        from timm.task import ClassificationTask
        return ClassificationTask(model, criterion, device=device, verbose=args.rank == 0)
    from timm_energykd.mixing import HighEnergyMix
    from timm_energykd.task import EnergyDistillationTask
    from timm_energykd.losses import create_distill_loss, uses_energy_temperature
    from timm_energykd.temperature import create_temperature_policy

    if not uses_energy_temperature(args.distill_loss):
        policy = None  # the loss takes --kd-temperature only
    elif args.temp_policy == 'gradation':
        policy = create_temperature_policy(
            'gradation', t_min=args.temp_min, t_max=args.temp_max, num_bins=args.gradation_bins,
            direction=args.temp_direction)
    else:
        policy = create_temperature_policy(
            'two_bin', base=args.kd_temperature, delta_low=args.temp_delta_low, delta_high=args.temp_delta_high,
            direction=args.temp_direction, low_temperature=args.temp_low, high_temperature=args.temp_high)
    loss_kwargs = {}
    if args.distill_loss in ('dkd', 'energy_dkd', 'dkd_ls'):
        loss_kwargs = dict(alpha=args.dkd_alpha, beta=args.dkd_beta, warmup_epochs=args.dkd_warmup)
    loss_kwargs.update(args.distill_loss_kwargs or {})
    he_da = None
    if args.he_da != 'off':
        he_da = HighEnergyMix(
            mode=args.he_da, alpha=args.he_da_alpha, selection=args.he_da_selection,
            rate=args.he_da_rate if args.he_da_selection == 'topk' else None)
    try:  # built once here so a misspelt or unknown keyword fails in one line naming the flag
        distill_loss = create_distill_loss(args.distill_loss, **loss_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f'--distill-loss-kwargs {args.distill_loss}: {str(e).strip().splitlines()[0]}') from None
    return EnergyDistillationTask(
        model, teacher, criterion,
        distill_loss=distill_loss,
        temperature=args.kd_temperature,
        temperature_policy=policy,
        energy_temperature=args.energy_temperature,
        energy_rate=args.energy_rate,
        threshold_mode=args.calibration,
        running_momentum=args.running_momentum,
        he_da=he_da,
        he_da_weight=args.he_da_weight,
        distill_loss_weight=args.distill_loss_weight,
        task_loss_weight=args.task_loss_weight,
        device=device,
        verbose=args.rank == 0,
    )


def _check_distill_loss(args, task) -> None:
    """Run the distillation loss once on random logits of the real class count, so a loss setting that only
    fails at its first forward (e.g. rekd's k against the class count) stops here, before calibration."""
    c = args.num_classes
    logits = torch.randn(2, c, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            task.distill_loss(logits, logits.flip(0), torch.arange(2) % c, torch.full((2,), float(args.kd_temperature)))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f'--distill-loss {args.distill_loss}: {str(e).strip().splitlines()[0]}') from None


def _needs_calibration(args, task) -> bool:
    if args.teacher is None or args.calibration != 'dataset':
        return False
    return True  # thresholds drive the energy losses / HE-DA and give every run comparable energy statistics


def _calibration_identity(args, num_samples: int) -> Dict[str, Any]:
    return OrderedDict(
        teacher=args.teacher,
        teacher_checkpoint_sha256=_sha256(args.teacher_checkpoint),
        teacher_pretrained=bool(args.teacher_pretrained),
        # only recorded when on, so caches written before the flag existed stay valid
        **({'teacher_prune_amount': args.teacher_prune_amount, 'teacher_blend_weight': args.teacher_blend_weight}
           if args.teacher_prune_amount > 0 else {}),
        dataset=args.dataset,
        data_dir=os.path.abspath(args.data_dir) if args.data_dir else None,
        train_split=args.train_split,
        imbalance_factor=args.imbalance_factor,
        imbalance_seed=args.imbalance_seed if args.imbalance_factor is not None else None,
        num_samples=int(num_samples),
        rate=args.energy_rate,
        energy_temperature=args.energy_temperature,
        input_size=list(args._data_config['input_size']),
    )


def _calibrate(args, task, loader_calib, output_dir, num_samples, amp_dtype, device):
    """Dataset thresholds (paper Eq. 9/11): from the cache when its identity matches, else one teacher pass."""
    from timm_energykd.energy import EnergyThresholds, calibrate_thresholds, energy_score, gather_variable_length

    num_bins = int(getattr(task, 'num_bins', 10))
    identity = _calibration_identity(args, num_samples)
    identity['num_bins'] = num_bins
    cache = args.calibration_cache or os.path.join(output_dir, 'energy_thresholds.json')
    he_rate = args.he_da_rate if (args.he_da != 'off' and args.he_da_selection == 'threshold') else None
    he_cache = os.path.splitext(cache)[0] + '_he_da.json'
    he_identity = dict(identity, rate=he_rate)

    thresholds = he_thresholds = None
    if os.path.isfile(cache):
        thresholds = EnergyThresholds.load_json(cache, expect_identity=identity)  # ValueError on mismatch
        _logger.info(f'Energy thresholds from cache {cache}: low={thresholds.low:.4f} high={thresholds.high:.4f}')
        if he_rate is not None and he_rate != args.energy_rate:
            if os.path.isfile(he_cache):
                he_thresholds = EnergyThresholds.load_json(he_cache, expect_identity=he_identity)
            else:
                thresholds = None  # recompute both in one pass
    if thresholds is None:
        _logger.info(f'Calibrating energy thresholds: one teacher pass over {num_samples} train images '
                     f'(train transforms, no mixup), r={args.energy_rate}, T_E={args.energy_temperature}')
        energies: List[torch.Tensor] = []

        def teacher_fn(x):
            logits = task.teacher_logits(x)
            if he_rate is not None:
                energies.append(energy_score(logits, args.energy_temperature))
            return logits

        thresholds = calibrate_thresholds(
            teacher_fn, loader_calib, args.energy_rate, energy_temperature=args.energy_temperature,
            num_bins=num_bins, device=device, identity=identity, amp_dtype=amp_dtype,
            progress=args.rank == 0, log_interval=args.log_interval)
        if he_rate is not None and he_rate != args.energy_rate:
            all_e = gather_variable_length(torch.cat(energies))
            he_thresholds = EnergyThresholds.from_energies(
                all_e, he_rate, energy_temperature=args.energy_temperature, num_bins=num_bins,
                identity=dict(he_identity, N=int(all_e.numel())))
        if args.rank == 0:
            thresholds.save_json(cache)
            if he_thresholds is not None:
                he_thresholds.save_json(he_cache)
            _logger.info(f'Saved energy thresholds to {cache}')
    task.set_thresholds(thresholds, he_thresholds)
    return thresholds


def _write_energy_plot(thresholds, path: str, teacher: str) -> None:
    """Histogram of the teacher's calibration energies with both thresholds (skipped without a histogram)."""
    from timm_energykd.plots import plot_energy_histogram
    try:
        plot_energy_histogram(thresholds, path, title=f'Teacher ({teacher}) energy, calibration set')
    except (ValueError, KeyError, TypeError) as e:  # e.g. thresholds from an old cache without a histogram
        _logger.warning(f'No energy histogram written: {e}')


def _resume(args, task, model, optimizer, loss_scaler) -> Optional[int]:
    """Restore model, optimizer, AMP scaler, epoch and the task state (thresholds); EMA after setup_ema."""
    ckpt = load_checkpoint_file(args.resume, flag='--resume')
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(f'--resume: {args.resume} is not a timm training checkpoint (no state_dict)')
    _check_resume_matches(args, ckpt)
    try:
        unwrap_model(model).load_state_dict(ckpt['state_dict'], strict=True)
    except RuntimeError as e:
        raise ValueError(f'--resume: {args.resume} does not match --model {args.model}: '
                         f'{str(e).splitlines()[0]}') from None
    if not args.no_resume_opt:
        if optimizer is not None and 'optimizer' in ckpt:
            optimizer.load_state_dict(ckpt['optimizer'])
        if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
            loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if ckpt.get('task_state'):
        task.load_task_state(ckpt['task_state'])
    args._resume_ckpt = ckpt
    epoch = ckpt.get('epoch')
    if epoch is None:
        return None
    return epoch + 1 if ckpt.get('version', 1) > 1 else epoch


# ------------------------------------------------------------------------------------------------------------
# loop
# ------------------------------------------------------------------------------------------------------------

def _read_terms(sums: Dict[str, torch.Tensor], count: int, args, epoch: int, batch_idx: int) -> Dict[str, float]:
    """The one host sync per log interval: averages of the task's 0-d tensors (+ the non-finite check)."""
    out = {}
    for k, v in sums.items():
        if args.distributed:
            v = reduce_tensor(v.detach().clone(), args.world_size)
        out[k] = v.item() / max(count, 1) if k != 'teacher_nonfinite' else v.item()
    if out.get('teacher_nonfinite', 0) > 0:
        raise RuntimeError(
            f'teacher produced non-finite logits for {int(out["teacher_nonfinite"])} samples '
            f'(epoch {epoch}, up to batch {batch_idx}); check --teacher-checkpoint, the input normalisation '
            f'and --amp-dtype (float16 can overflow; try bfloat16)')
    return out


def train_one_epoch(epoch, task, loader, optimizer, args, device, lr_scheduler=None, amp_autocast=nullcontext,
                    loss_scaler=None, mixup_fn=None, num_updates_start=0) -> Dict[str, float]:
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and hasattr(loader, 'mixup_enabled'):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    second_order = hasattr(optimizer, 'is_second_order') and optimizer.is_second_order
    accum = args.grad_accum_steps
    task.train()
    if hasattr(task, 'set_progress'):
        task.set_progress(epoch)
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = num_updates_start
    last_idx = num_batches - 1
    sums: Dict[str, torch.Tensor] = {}
    count = 0
    seen = 0
    t_start = t_log = time.time()
    seen_log = 0
    terms: Dict[str, float] = {}
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if hasattr(task, 'set_progress') and args.teacher is not None:
            task.set_progress(epoch + batch_idx / num_batches)  # fractional epochs for DKD warm-up

        sync_ctx = task.no_sync() if (args.distributed and not need_update) else nullcontext()
        with sync_ctx:
            with amp_autocast():
                out = task(input, target)
            loss = out['loss'] / accum
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                            create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                                           value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        # statistics stay on the device; read at the log sync only
        for k in _TERMS + ('teacher_nonfinite',):
            if k in out:
                v = out[k].detach().float()
                sums[k] = sums[k] + v if k in sums else v.clone()
        count += 1
        seen += input.shape[0]
        if not need_update:
            continue
        optimizer.zero_grad()
        num_updates += 1
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)

        update_idx = batch_idx // accum
        if last_batch or update_idx % args.log_interval == 0:
            terms = _read_terms(sums, count, args, epoch, batch_idx)
            now = time.time()
            ips = (seen - seen_log) * args.world_size / max(now - t_log, 1e-9)
            t_log, seen_log = now, seen
            lr = optimizer.param_groups[0]['lr']
            if args.rank == 0:
                msg = (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                       f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  Loss: {terms["loss"]:.4f}')
                if 'kd_loss' in terms:
                    msg += f'  task: {terms["task_loss"]:.4f}  kd: {terms["kd_loss"]:.4f}'
                if 'he_da_loss' in terms:
                    msg += f'  he-da: {terms["he_da_loss"]:.4f} ({100 * terms["he_da_frac"]:.0f}% mixed)'
                if 'energy_mean' in terms:
                    msg += (f'  E: {terms["energy_mean"]:.3f}  low/high: {100 * terms["frac_low"]:.0f}%/'
                            f'{100 * terms["frac_high"]:.0f}%  T: {terms["temp_mean"]:.2f}')
                msg += f'  {ips:>6.1f} img/s  LR: {lr:.3e}'
                _logger.info(msg)

    elapsed = time.time() - t_start
    metrics = OrderedDict((k, v) for k, v in terms.items() if k != 'teacher_nonfinite')
    if 'frac_low' in metrics and 'frac_high' in metrics:  # summary.csv: the three energy groups' shares
        metrics['frac_mid'] = 1.0 - metrics['frac_low'] - metrics['frac_high']
    metrics['img_per_sec'] = seen * args.world_size / max(elapsed, 1e-9)
    metrics['epoch_time'] = elapsed
    return metrics, num_updates


def validate(model, loader, args, device, amp_autocast=nullcontext, log_suffix='') -> Dict[str, float]:
    loss_fn = nn.CrossEntropyLoss().to(device)
    losses_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    num_classes = None
    with torch.no_grad():
        for input, target in loader:
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output.float(), target)
            num_classes = output.shape[-1]
            acc1, acc5 = accuracy(output, target, topk=(1, min(5, num_classes)))
            if args.distributed:
                loss = reduce_tensor(loss.data, args.world_size)
                acc1 = reduce_tensor(acc1, args.world_size)
                acc5 = reduce_tensor(acc5, args.world_size)
            n = input.size(0)
            losses_m.update(loss.item(), n)
            top1_m.update(acc1.item(), n)
            top5_m.update(acc5.item(), n)
    metrics = OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])
    if args.rank == 0:
        _logger.info(f'Test{log_suffix}: Loss: {metrics["loss"]:.4f}  Acc@1: {metrics["top1"]:.3f}  '
                     f'Acc@5: {metrics["top5"]:.3f}')
    return metrics


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------

def train(args, args_text: str) -> Dict[str, Any]:
    """Run one training (plain or distillation) from parsed + validated args; returns a result dict."""
    t0 = time.time()
    _check_trainer_args(args)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, getattr(args, 'grad_accum_steps', 1))
    device = _resolve_device(args)
    if device.type != 'cuda':
        args.prefetcher = False  # timm's prefetcher is CUDA-stream based
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {device}')
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        if device.type == 'cpu' and amp_dtype == torch.float16:
            raise ValueError('--amp-dtype float16 is not supported on CPU; use --amp-dtype bfloat16')
    random_seed(args.seed, args.rank)

    # ---- data (fails fast on a bad data dir) ----
    dataset_train, dataset_eval = create_train_eval_datasets(args)
    ds_classes = dataset_num_classes(dataset_train)
    if args.num_classes is None:
        if ds_classes is None:
            raise ValueError('--num-classes is required: the class count cannot be read from the dataset')
        args.num_classes = ds_classes
    elif ds_classes is not None and ds_classes > args.num_classes:
        raise ValueError(f'--num-classes {args.num_classes} is smaller than the dataset\'s {ds_classes} classes')
    _check_images(dataset_train)
    if dataset_eval is not None:
        _check_images(dataset_eval)

    # ---- student ----
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
            global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
            checkpoint_path=args.initial_checkpoint or None, **(args.model_kwargs or {}))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        if not args.initial_checkpoint:
            raise
        # timm reads it with torch.load(weights_only=True); its errors span many lines
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f'--initial-checkpoint: cannot load {args.initial_checkpoint} into --model {args.model}: '
                         f'{first[:300]}') from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    args._data_config = data_config

    # ---- teacher (its own head; refuses a class-count mismatch) ----
    teacher = None
    if args.teacher is not None:
        args.teacher_pretrained = resolve_teacher_pretrained(args.teacher, args.teacher_pretrained,
                                                             args.teacher_checkpoint)
        teacher = build_teacher(args.teacher, args.num_classes, pretrained=args.teacher_pretrained,
                                checkpoint=args.teacher_checkpoint, in_chans=in_chans)
        if args.teacher_prune_amount > 0:
            # R2KD's targets: teacher logits blended with those of a lightly pruned copy (also used for energies)
            teacher = BlendedTeacher(teacher, teacher_weight=args.teacher_blend_weight,
                                     prune_amount=args.teacher_prune_amount)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if args.sync_bn and args.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # ---- mixup / criterion / task ----
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    collate_fn = mixup_fn = None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    criterion = _create_criterion(args, mixup_active)
    task = _create_task(args, model, teacher, criterion, device)
    task.to(device)
    if teacher is not None:
        _check_distill_loss(args, task)

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    amp_autocast = nullcontext
    loss_scaler = None
    if amp_dtype is not None:
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
    if args.rank == 0:
        _logger.info(f'Student {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{args.num_classes} classes; teacher: {args.teacher}; distill loss: {args.distill_loss}; '
                     f'AMP: {args.amp_dtype if amp_dtype else "off"}')

    # ---- resume (model, optimizer, scaler, epoch, thresholds) ----
    resume_epoch = None
    if args.resume:
        resume_epoch = _resume(args, task, model, optimizer, loss_scaler)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        ckpt = getattr(args, '_resume_ckpt', None)
        if ckpt is not None and 'state_dict_ema' in ckpt:
            unwrap_model(task.get_trainable_module(ema=True)).load_state_dict(ckpt['state_dict_ema'])
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None)

    # ---- loaders ----
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common_loader = dict(
        input_size=data_config['input_size'], interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=args.distributed, pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
    )
    train_aug = dict(
        is_training=True, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
    )
    train_aug['interpolation'] = train_interpolation
    loader_kw = dict(common_loader, **train_aug)
    loader_train = create_loader(dataset_train, batch_size=args.batch_size, collate_fn=collate_fn, **loader_kw)
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            crop_pct=data_config['crop_pct'], **common_loader)

    # ---- scheduler ----
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing = eval_metric == 'loss'
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    start_epoch = 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    elif resume_epoch is not None:
        start_epoch = resume_epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    # ---- output folder (only now: bad flags / files have failed above without leaving a folder) ----
    output_dir = None
    if args.rank == 0:
        if args.experiment:
            exp_name = args.experiment
        else:
            exp_name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), timm.models.get_arch_name(args.model),
                                 str(data_config['input_size'][-1])])
        base_dir = args.output if args.output else './output/train'
        created_dir = not os.path.exists(os.path.join(base_dir, exp_name))
        output_dir = get_outdir(base_dir, exp_name)
        args._new_output_dir = output_dir if created_dir else None  # removed by main() if no checkpoint follows
        write_atomic(os.path.join(output_dir, 'args.yaml'), args_text)
    if args.distributed:
        import torch.distributed as dist
        holder = [output_dir]
        dist.broadcast_object_list(holder, src=0)
        output_dir = holder[0]

    # ---- energy thresholds (paper: one teacher pass over the train set before training) ----
    thresholds = getattr(task, 'thresholds', None)
    if teacher is not None and thresholds is None and _needs_calibration(args, task):
        dataset_calib = dataset_train
        if args.distributed:
            # a strided split, not the train DistributedSampler: that one pads with repeated samples,
            # which would enter the thresholds twice; this way the ranks together see each image once
            dataset_calib = TransformSubset(dataset_train, range(args.rank, len(dataset_train), args.world_size))
        loader_calib = create_loader(
            dataset_calib, batch_size=args.batch_size, **dict(loader_kw, distributed=False))  # no mixup collate
        # a training loader drops the last partial batch; the thresholds must see every image
        batch_sampler = getattr(getattr(loader_calib, 'loader', loader_calib), 'batch_sampler', None)
        if batch_sampler is not None and hasattr(batch_sampler, 'drop_last'):
            batch_sampler.drop_last = False
        thresholds = _calibrate(args, task, loader_calib, output_dir, len(dataset_train), amp_dtype, device)
    elif thresholds is not None and args.rank == 0:
        _logger.info(f'Energy thresholds restored from the checkpoint: low={thresholds.low:.4f} '
                     f'high={thresholds.high:.4f}')

    if thresholds is not None and args.rank == 0:
        _write_energy_plot(thresholds, os.path.join(output_dir, 'energy_histogram.png'), args.teacher)

    # ---- checkpoints ----
    saver = None
    if args.rank == 0:
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=decreasing, max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir) \
                and hasattr(saver, 'load_state_dict_from_checkpoint'):
            saver.load_state_dict_from_checkpoint(args.resume)
    args.__dict__.pop('_resume_ckpt', None)

    if args.rank == 0:
        _logger.info(f'Scheduled epochs: {num_epochs} (starting at {start_epoch}), {updates_per_epoch} updates '
                     f'per epoch. Output: {output_dir}')

    best_metric, best_epoch = None, None
    eval_metrics: Dict[str, float] = {}
    summary_path = os.path.join(output_dir, 'summary.csv') if output_dir else None
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        # every epoch's randomness (shuffle, augmentation, dropout, HE-DA / mixup draws) depends only on
        # (seed, rank, epoch), so a run resumed from an epoch checkpoint replays exactly what an uninterrupted
        # run would have done; epoch 0 is seeded like timm (seed + rank)
        random_seed(args.seed, args.rank + args.world_size * epoch)
        train_metrics, num_updates = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler=lr_scheduler,
            amp_autocast=amp_autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn, num_updates_start=num_updates)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

        eval_metrics = {}
        if loader_eval is not None:
            eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, amp_autocast)
            if task.has_ema() and not args.model_ema_force_cpu:
                ema_metrics = validate(task.get_eval_model(ema=True), loader_eval, args, device, amp_autocast,
                                       log_suffix=' (EMA)')
                eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
        latest_metric = eval_metrics.get(eval_metric, train_metrics.get('loss'))
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)
        if args.rank == 0:
            lrs = [pg['lr'] for pg in optimizer.param_groups]
            update_summary(epoch, train_metrics, eval_metrics, filename=summary_path, lr=sum(lrs) / len(lrs),
                           write_header=not os.path.exists(summary_path))
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)

    result = dict(output_dir=output_dir, best_metric=best_metric, best_epoch=best_epoch, eval_metrics=eval_metrics,
                  thresholds=thresholds, num_epochs=num_epochs, time_s=time.time() - t0, task=task, model=model)
    if args.rank == 0:
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        _export_hub(args, task, output_dir, eval_metrics, thresholds, dataset_train)
    return result


def _export_hub(args, task, output_dir, eval_metrics, thresholds, dataset_train) -> None:
    """--export-hub DIR / --push-to-hub REPO at the end of training (best weights when a best exists)."""
    if not (args.export_hub or args.push_to_hub):
        return
    from timm_energykd import hub
    model = unwrap_model(task.get_trainable_module())
    best = os.path.join(output_dir, 'model_best.pth.tar')
    metrics = eval_metrics or None
    if os.path.isfile(best):
        state = load_checkpoint_file(best, flag='model_best')
        model.load_state_dict(state['state_dict'])
        # the card records the best epoch's numbers (the exported weights), not the last epoch's
        metrics = hub.read_summary_metrics(os.path.join(output_dir, 'summary.csv'), state.get('epoch')) or metrics
    run_info = {k: v for k, v in vars(args).items() if not k.startswith('_')}
    if thresholds is not None:
        run_info['thresholds'] = thresholds.to_dict() if hasattr(thresholds, 'to_dict') else thresholds
    he_thresholds = getattr(task, 'he_da_thresholds', None)
    if he_thresholds is not None:
        run_info['he_da_thresholds'] = he_thresholds.to_dict()
    label_names = None
    classes = getattr(getattr(dataset_train, 'reader', None), 'class_to_idx', None)
    if classes and len(classes) == args.num_classes:
        label_names = [c for c, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    folder = args.export_hub or os.path.join(output_dir, 'hub')
    hub.export_for_hub(model, folder, run_info=run_info, metrics=metrics, label_names=label_names,
                       data_config=getattr(args, '_data_config', None))
    _logger.info(f'Exported the student for the Hub to {folder}')
    if args.push_to_hub:
        try:
            url = hub.push_to_hub(folder, args.push_to_hub, private=args.hub_private, revision=args.hub_revision)
        except hub.HubPushError as e:  # the run's outputs and the export are on disk: say how to retry
            _logger.error(f'{e}. Retry with: python -m timm_energykd.hub push {folder} {args.push_to_hub}')
            raise
        _logger.info(f'Pushed to {url}')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """CLI entry: parse (timm parity) -> validate -> train (or the offline demo). Returns the result dict."""
    if not logging.getLogger().handlers:  # the demo calls main() several times: configure logging once
        setup_default_logging()
    args, args_text = parse_args(argv)
    if args.demo:
        from timm_energykd.demo import run_demo
        return run_demo(args, train_fn=main)
    validate_args(args)
    try:
        return train(args, args_text)
    except BaseException:
        _remove_unused_output_dir(getattr(args, '_new_output_dir', None))
        raise
    finally:
        args.__dict__.pop('_new_output_dir', None)
        if getattr(args, 'distributed', False) and torch.distributed.is_initialized():
            # tear gloo/NCCL down explicitly: exiting with a live process group can abort at interpreter exit
            torch.distributed.destroy_process_group()


def _remove_unused_output_dir(output_dir: Optional[str]) -> None:
    """A run that fails before it has saved anything (bad calibration cache, non-finite teacher, unreadable
    data...) leaves no half-made output folder; only a folder this run created is touched."""
    if not output_dir or not os.path.isdir(output_dir):
        return
    if any(name.endswith('.pth.tar') or name.startswith('energy_thresholds') for name in os.listdir(output_dir)):
        return  # a checkpoint to resume from, or a finished calibration worth keeping
    import shutil
    shutil.rmtree(output_dir, ignore_errors=True)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: bad input is one clear line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f'train_energykd.py: error: {e}', file=sys.stderr)
        return 2
    return 0
