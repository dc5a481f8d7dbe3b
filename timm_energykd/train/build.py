"""Build what a run needs from its args, the way timm's ``train.py`` builds it.

Each function is one step of timm's ``main()`` with the same flags and the same meaning: device, student
(``--pretrained-path``, ``--head-init-*``, ``--model-dtype``, ``--fast-norm``), learning rate from
``--lr-base*`` when ``--lr`` is unset, optimizer with ``--opt-kwargs``, loaders and scheduler. The teacher and
the distillation task come from the library (``timm_energykd.teacher``, ``timm_energykd.task``).
"""
import importlib
import logging
import pickle
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import timm
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler, init_distributed_device

from ..data import TransformSubset
from ..replay import CALIBRATION_EPOCH, loader_is_exact, seed_loader_epoch
from ..teacher import BlendedTeacher
from ..teacher import build_teacher, resolve_teacher_pretrained

_logger = logging.getLogger('train')


@dataclass
class Precision:
    """``--model-dtype`` (weights and inputs) and ``--amp`` (autocast, loss scaling for float16)."""
    model_dtype: Optional[torch.dtype]
    amp_dtype: Optional[torch.dtype]
    autocast: Callable
    loss_scaler: Optional[NativeScaler]


def setup_device(args) -> torch.device:
    """``--device-modules`` imported first (they register device backends), then timm's device setup."""
    for module in args.device_modules or ():
        importlib.import_module(module)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if str(args.device).startswith('cuda') and not torch.cuda.is_available():
        _logger.warning('CUDA is not available, training on CPU (pass --device cpu to silence this)')
        args.device = 'cpu'
    device = init_distributed_device(args)
    if device.type != 'cuda':
        args.prefetcher = False  # timm's prefetcher is CUDA-stream based
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {device}')
    return device


def setup_precision(args, device: torch.device) -> Precision:
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    if model_dtype is not None and args.rank == 0 and model_dtype == torch.float16:
        _logger.warning('float16 is not recommended for training, for half precision bfloat16 is recommended.')
    amp_dtype = None
    autocast, scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            scaler = NativeScaler(device=device.type)  # bfloat16 needs no loss scaling
    return Precision(model_dtype, amp_dtype, autocast, scaler)


def create_student(args, in_chans: int) -> nn.Module:
    """timm's student: ``create_model`` with timm's arguments, then ``--head-init-scale/bias``."""
    if args.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()
    factory_kwargs = {}
    if args.pretrained_path:
        # timm: the file has priority over the model's url / hub weights; num_classes=-1 adapts the head
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
            global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
            checkpoint_path=args.initial_checkpoint or None, **factory_kwargs, **(args.model_kwargs or {}))
    except TypeError as e:  # e.g. a local-dir:/hf-hub: config.json whose model_args the architecture lacks
        raise ValueError(f'--model {args.model}: cannot build it: {str(e).splitlines()[0]}') from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        flag = '--initial-checkpoint' if args.initial_checkpoint else '--pretrained-path' if args.pretrained_path else None
        if flag is None:
            raise
        # timm reads it with torch.load(weights_only=True); its errors span many lines
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f'{flag}: cannot load {args.initial_checkpoint or args.pretrained_path} into --model '
                         f'{args.model}: {first[:300]}') from None
    if args.head_init_scale is not None:
        with torch.no_grad():
            model.get_classifier().weight.mul_(args.head_init_scale)
            model.get_classifier().bias.mul_(args.head_init_scale)
    if args.head_init_bias is not None:
        nn.init.constant_(model.get_classifier().bias, args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def create_teacher(args, in_chans: int) -> Optional[nn.Module]:
    """The teacher with its own head (a class-count mismatch is refused), optionally R2KD's blend."""
    if args.teacher is None:
        return None
    args.teacher_pretrained = resolve_teacher_pretrained(args.teacher, args.teacher_pretrained, args.teacher_checkpoint)
    try:
        teacher = build_teacher(args.teacher, args.num_classes, pretrained=args.teacher_pretrained,
                                checkpoint=args.teacher_checkpoint, in_chans=in_chans)
    except TypeError as e:  # e.g. a local-dir:/hf-hub: config.json whose model_args the architecture lacks
        raise ValueError(f'--teacher {args.teacher}: cannot build it: {str(e).splitlines()[0]}') from None
    if args.teacher_prune_amount > 0:
        # R2KD's targets: teacher logits blended with those of a lightly pruned copy (also used for energies)
        teacher = BlendedTeacher(teacher, teacher_weight=args.teacher_blend_weight, prune_amount=args.teacher_prune_amount)
    return teacher


def place_models(args, model, teacher, device, precision: Precision):
    """Device, ``--model-dtype`` and ``--channels-last`` for both models; SyncBN for the student."""
    model.to(device=device, dtype=precision.model_dtype)
    if teacher is not None:
        teacher.to(device=device, dtype=precision.model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if args.sync_bn and args.distributed:
        args.dist_bn = ''  # as timm: no BN distribution when SyncBN keeps the statistics in sync
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def create_mixup(args):
    """timm's Mixup / FastCollateMixup from the flags; returns (collate_fn, mixup_fn, active)."""
    active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if not active:
        return None, None, False
    mixup_args = dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.prefetcher:
        return FastCollateMixup(**mixup_args), None, True
    return None, Mixup(**mixup_args), True


def create_criterion(args, mixup_active: bool) -> nn.Module:
    """timm's train loss choice: BCE, soft-target CE under mixup, label smoothing, or plain CE."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def resolve_lr(args) -> float:
    """timm's rule: without ``--lr``, ``lr = lr_base * ratio`` with ratio = global batch / lr_base_size, square
    rooted for ada* / lamb optimizers (or as ``--lr-base-scale`` says). Logged either way."""
    if not args.lr:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        ratio = global_batch / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            ratio = ratio ** 0.5
        args.lr = args.lr_base * ratio
        if args.rank == 0:
            _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                         f'and effective global batch size ({global_batch:g}) with {args.lr_base_scale} scaling.')
    elif args.rank == 0:
        _logger.info(f'Learning rate ({args.lr}) set by --lr (--lr-base is not used).')
    return args.lr


def create_optimizer(args, model: nn.Module):
    """timm's optimizer factory with ``--opt-kwargs`` on top (an unknown key fails in the optimizer)."""
    resolve_lr(args)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **(args.opt_kwargs or {}))
    except TypeError as e:
        raise ValueError(f'--opt {args.opt} / --opt-kwargs {args.opt_kwargs}: {str(e).splitlines()[0]}') from None
    if args.rank == 0:
        defaults = dict(optimizer.defaults, weight_decay=args.weight_decay)
        _logger.info(f'Created {type(optimizer).__name__} ({args.opt}) optimizer: '
                     + ', '.join(f'{k}: {v}' for k, v in defaults.items()))
    return optimizer


def create_loaders(args, dataset_train, dataset_eval, data_config, device, collate_fn, model_dtype):
    """timm's train / eval loaders; also the calibration loader's settings (train transforms, no mixup)."""
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(
        input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=args.prefetcher, img_dtype=model_dtype or torch.float32,
    )
    train_kw = dict(
        common, is_training=True, interpolation=train_interpolation, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, re_split=args.resplit, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        use_multi_epochs_loader=args.use_multi_epochs_loader, worker_seeding=args.worker_seeding,
    )
    loader_train = create_loader(dataset_train, batch_size=args.batch_size, collate_fn=collate_fn, **train_kw)
    if not loader_is_exact(loader_train) and args.rank == 0:
        _logger.warning('--use-multi-epochs-loader: workers prefetch across epochs, so augmentation is not a '
                        'function of (seed, epoch) and a resumed run is not bit-identical to an uninterrupted one')
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return loader_train, loader_eval, train_kw


def create_calibration_loader(args, dataset_train, train_kw):
    """Every train image exactly once, with the train transforms and without mixup (paper Eq. 9/11)."""
    dataset = dataset_train
    if args.distributed:
        # a strided split, not the train DistributedSampler: that one pads with repeated samples,
        # which would enter the thresholds twice; this way the ranks together see each image once
        dataset = TransformSubset(dataset_train, range(args.rank, len(dataset_train), args.world_size))
    loader = create_loader(dataset, batch_size=args.batch_size, **dict(train_kw, distributed=False))
    # a training loader drops the last partial batch; the thresholds must see every image
    batch_sampler = getattr(getattr(loader, 'loader', loader), 'batch_sampler', None)
    if batch_sampler is not None and hasattr(batch_sampler, 'drop_last'):
        batch_sampler.drop_last = False
    # augmentation per (seed, sample index) of its own stream: equal for any worker / process count
    seed_loader_epoch(loader, args.seed, CALIBRATION_EPOCH, args.rank)
    return loader


def create_scheduler(args, optimizer, updates_per_epoch: int, decreasing: bool):
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
    return lr_scheduler, num_epochs


def create_task(args, model, teacher, criterion, device):
    """EnergyDistillationTask with a teacher, else timm's ClassificationTask (plain training)."""
    if teacher is None:
        from timm.task import ClassificationTask
        return ClassificationTask(model, criterion, device=device, verbose=args.rank == 0)
    from timm_energykd.mixing import HighEnergyMix
    from timm_energykd.task import EnergyDistillationTask
    from timm_energykd.losses import create_distill_loss, loss_kwargs_from_args, uses_energy_temperature
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
            direction=args.temp_direction, low_temperature=args.temp_low, high_temperature=args.temp_high,
            rule=args.energykd_rules)
    loss_kwargs = loss_kwargs_from_args(args.distill_loss, args)  # the flags the loss declares (e.g. --dkd-*)
    loss_kwargs.update(args.distill_loss_kwargs or {})
    he_da = None
    if args.he_da != 'off':
        he_da = HighEnergyMix(
            mode=args.he_da, alpha=args.he_da_alpha, selection=args.he_da_selection,
            rate=args.he_da_rate if args.he_da_selection == 'topk' else None, rule=args.energykd_rules)
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


def check_distill_loss(args, task) -> None:
    """Run the distillation loss once on random logits of the real class count, so a loss setting that only
    fails at its first forward (e.g. rekd's k against the class count) stops here, before calibration."""
    c = args.num_classes
    logits = torch.randn(2, c, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            task.distill_loss(logits, logits.flip(0), torch.arange(2) % c, torch.full((2,), float(args.kd_temperature)))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f'--distill-loss {args.distill_loss}: {str(e).strip().splitlines()[0]}') from None


def data_config_for(args, model) -> Any:
    return resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
