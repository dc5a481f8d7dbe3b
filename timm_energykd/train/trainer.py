"""The trainer: parse, check, build, calibrate, loop, finish, the way timm's ``train.py`` does it.

    python train_energykd.py DATA_DIR --teacher resnet50 --teacher-checkpoint t.pth.tar \\
        --model mobilenetv1_100 --energy-rate 0.3
    python train_energykd.py DATA_DIR --model cifar_resnet32x4 ...      # no --teacher: plain training
    python train_energykd.py --demo                                     # offline demo, ~2 min on CPU

Same flags, ``--config`` YAML and output folder (``args.yaml``, ``summary.csv``, ``last.pth.tar``,
``model_best.pth.tar``) as timm's ``train.py``; see docs/TRAINING.md and docs/FLAGS.md. This module only
orders the steps; each step lives in ``checks`` / ``build`` / ``loop`` / ``checkpoint`` and the method itself
in the library (``timm_energykd.task``, ``timm_energykd.calibration``).
"""
import logging
import os
import shutil
import sys
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Dict, Optional, Sequence

import torch

import timm
from timm.utils import distribute_bn, random_seed, setup_default_logging, update_summary
from timm.utils.model import unwrap_model

import timm_energykd  # noqa: F401  (registers models and losses)
from ..calibration import calibrate_or_load
from ..data import create_train_eval_datasets, dataset_num_classes
from ..energy_report import energy_bin_report, write_energy_bin_report
from ..files import DiskWriteError, write_atomic
from ..plots import plot_training_curves
from ..replay import EpochSeededDataset, seed_loader_epoch
from ..teacher_source import StoredTeacher
from .teacher_cache import setup_teacher_cache
from . import build
from .args import parse_args
from .checkpoint import AtomicCheckpointSaver, resume_checkpoint, trim_summary
from .checks import check_dataset_images, check_trainer_args, validate_args
from .finish import export_hub
from .identity import run_identity
from .outdir import claim_output_dir
from .loop import NonFiniteError, train_one_epoch, validate

_logger = logging.getLogger('train')


# ------------------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------------------

def build_data(args):
    """Datasets (fails fast on a bad data dir), the class count, and the startup image check."""
    dataset_train, dataset_eval = create_train_eval_datasets(args)
    ds_classes = dataset_num_classes(dataset_train)
    if args.num_classes is None:
        if ds_classes is None:
            raise ValueError('--num-classes is required: the class count cannot be read from the dataset')
        args.num_classes = ds_classes
    elif ds_classes is not None and ds_classes != args.num_classes:
        raise ValueError(f'--num-classes {args.num_classes} does not match the dataset\'s {ds_classes} classes '
                         f'({args.data_dir}); drop --num-classes or fix it')
    check_dataset_images(dataset_train)
    if dataset_eval is not None:
        check_dataset_images(dataset_eval)
    if not isinstance(dataset_train, torch.utils.data.IterableDataset):
        # augmentation per (seed, epoch, sample index): the same for any --workers, persistent or not, and any
        # process count, so a resumed run replays the uninterrupted one exactly (seed_loader_epoch each epoch)
        dataset_train = EpochSeededDataset(dataset_train, seed=args.seed)
    return dataset_train, dataset_eval


def calibration_identity(args, num_samples: int) -> Dict[str, Any]:
    """What the dataset thresholds depend on; a cache or checkpoint with another identity is refused."""
    return OrderedDict(
        teacher=args.teacher,
        teacher_checkpoint_sha256=args.run_identity['teacher_checkpoint_sha256'],  # hashed once a run
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
        data_fingerprint=args.run_identity['data_fingerprint'],
        input_size=list(args._data_config['input_size']),
        # only recorded for the authors' rules, so caches written before the flag existed stay valid
        **({'rule': 'authors', 'drop_last': True} if args.energykd_rules == 'authors' else {}),
    )


def calibrate(args, task, dataset_train, train_kw, output_dir, precision, device):
    """The paper's thresholds: restored from the checkpoint, else from the cache or one teacher pass."""
    thresholds = getattr(task, 'thresholds', None)
    source = getattr(task, 'teacher_source', None)  # --teacher-cache: records the pass, or replays it
    if source is not None and not source.replay and (thresholds is not None or args.calibration != 'dataset'):
        # the store keeps the pass even when this run does not calibrate, for the runs that replay it and do
        source.finish_calibration(*source.calibration(task, build.create_calibration_loader(args, dataset_train, train_kw)))
    if thresholds is not None:
        if args.rank == 0:
            _logger.info(f'Energy thresholds restored from the checkpoint: low={thresholds.low:.4f} '
                         f'high={thresholds.high:.4f}')
        return thresholds
    if args.teacher is None or args.calibration != 'dataset':
        return None
    cache = args.calibration_cache or os.path.join(output_dir, 'energy_thresholds.json')
    he_rate = args.he_da_rate if (args.he_da != 'off' and args.he_da_selection == 'threshold') else None
    if not os.path.isfile(cache) and args.rank == 0:
        _logger.info(f'Calibrating energy thresholds: one teacher pass over {len(dataset_train)} train images '
                     f'(train transforms, no mixup), r={args.energy_rate}, T_E={args.energy_temperature}')
    loader = build.create_calibration_loader(args, dataset_train, train_kw)
    teacher_fn, loader = source.calibration(task, loader) if source is not None else (task.teacher_logits, loader)
    cal = calibrate_or_load(
        teacher_fn, loader, args.energy_rate, cache=cache,
        identity=calibration_identity(args, len(dataset_train)), energy_temperature=args.energy_temperature,
        num_bins=int(getattr(task, 'num_bins', 10)), he_da_rate=he_rate, device=device,
        amp_dtype=precision.amp_dtype, save=args.rank == 0, progress=args.rank == 0, log_interval=args.log_interval,
        rule=args.energykd_rules, drop_last=args.energykd_rules == 'authors')
    if source is not None:
        source.finish_calibration(teacher_fn, loader)
    if cal.from_cache and args.rank == 0:
        _logger.info(f'Energy thresholds from cache {cache}: low={cal.thresholds.low:.4f} high={cal.thresholds.high:.4f}')
    task.set_thresholds(cal.thresholds, cal.he_da_thresholds)
    return cal.thresholds


def write_energy_plot(thresholds, path: str, teacher: str, he_da_thresholds=None) -> None:
    """Histogram of the teacher's calibration energies with both thresholds (skipped without a histogram)."""
    from ..plots import plot_energy_histogram
    try:
        plot_energy_histogram(thresholds, path, title=f'Teacher ({teacher}) energy, calibration set',
                              he_da_thresholds=he_da_thresholds)
    except (ValueError, KeyError, TypeError) as e:  # e.g. thresholds from an old cache without a histogram
        _logger.warning(f'No energy histogram written: {e}')


def create_output_dir(args, args_text: str, data_config):
    """timm's folder (``<output>/<experiment>``, default ``<date>-<model>-<img size>``), claimed by rank 0 for
    this run only (``outdir.claim_output_dir``); returns (path, lock), the lock held until the run ends."""
    output_dir, lock = None, None
    if args.rank == 0:
        exp_name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), timm.models.get_arch_name(args.model),
            str(data_config['input_size'][-1])])
        output_dir, created, lock = claim_output_dir(
            args.output or './output/train', exp_name, named=bool(args.experiment), resume=args.resume)
        args._new_output_dir = output_dir if created else None  # removed by main() if no checkpoint follows
        write_atomic(os.path.join(output_dir, 'args.yaml'), args_text)
    if args.distributed:
        import torch.distributed as dist
        holder = [output_dir]
        dist.broadcast_object_list(holder, src=0)
        output_dir = holder[0]
    return output_dir, lock


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


# ------------------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------------------

def train(args, args_text: str) -> Dict[str, Any]:
    """Run one training (plain or distillation) from parsed + validated args; returns a result dict."""
    t0 = time.time()
    check_trainer_args(args)
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    device = build.setup_device(args)
    if args.rank != 0:  # one log per run: other ranks report warnings and errors only
        logging.getLogger('timm_energykd').setLevel(logging.WARNING)
        logging.getLogger('timm').setLevel(logging.WARNING)
    precision = build.setup_precision(args, device)
    random_seed(args.seed, args.rank)

    # ---- data, models, task, optimizer ----
    dataset_train, dataset_eval = build_data(args)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model = build.create_student(args, in_chans)
    if args.rank == 0:
        _logger.info(f'Model {args.model} created, param count:{sum(p.numel() for p in model.parameters())}')
    data_config = build.data_config_for(args, model)
    args._data_config = data_config
    args.run_identity = run_identity(args, dataset_train)
    teacher_cache = setup_teacher_cache(args, dataset_train)  # None without --teacher-cache
    teacher = StoredTeacher(args.num_classes) if teacher_cache is not None and teacher_cache.replay \
        else build.create_teacher(args, in_chans)
    model = build.place_models(args, model, teacher, device, precision)
    collate_fn, mixup_fn, mixup_active = build.create_mixup(args)
    criterion = build.create_criterion(args, mixup_active).to(device)
    task = build.create_task(args, model, teacher, criterion, device)
    task.to(device)
    if teacher_cache is not None:
        teacher_cache.attach(task)
    if teacher is not None:
        build.check_distill_loss(args, task)
    optimizer = build.create_optimizer(args, model)
    if args.rank == 0:
        _logger.info(f'Student {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{args.num_classes} classes; ' + (
                         f'teacher {args.teacher}, distill loss {args.distill_loss}' if teacher is not None
                         else 'no teacher (plain training)') + f'; AMP: {args.amp_dtype if args.amp else "off"}')

    # ---- resume (model, optimizer, scaler, epoch, thresholds), EMA, compile, DDP ----
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_checkpoint(args, task, model, optimizer, precision.loss_scaler)
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
        # --no-ddp-bb as in timm; the default is DDP's own (torch 2.14 warns on an explicit broadcast_buffers)
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None, **ddp_kwargs)

    # ---- loaders and schedule ----
    loader_train, loader_eval, train_kw = build.create_loaders(
        args, dataset_train, dataset_eval, data_config, device, collate_fn, precision.model_dtype)
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing = eval_metric == 'loss'
    lr_scheduler, num_epochs = build.create_scheduler(args, optimizer, updates_per_epoch, decreasing)
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
    if start_epoch >= num_epochs:
        if args.rank == 0:
            _logger.info(f'Nothing to do: the checkpoint is at epoch {start_epoch} of {num_epochs} scheduled epochs '
                         '(raise --epochs to train further)')
        args.__dict__.pop('_resume_ckpt', None)
        return dict(output_dir=None, best_metric=None, best_epoch=None, eval_metrics={}, thresholds=None,
                    num_epochs=num_epochs, time_s=time.time() - t0, task=task, model=model, nothing_to_do=True)

    # ---- output folder (only now: bad flags / files have failed above without leaving a folder) ----
    output_dir, output_lock = create_output_dir(args, args_text, data_config)  # noqa: F841 (held open)

    # ---- energy thresholds (paper: one teacher pass over the train set before training) ----
    thresholds = calibrate(args, task, dataset_train, train_kw, output_dir, precision, device)
    if thresholds is not None and args.rank == 0:
        write_energy_plot(thresholds, os.path.join(output_dir, 'energy_histogram.png'), args.teacher,
                          getattr(task, 'he_da_thresholds', None))

    # ---- checkpoints ----
    saver = None
    if args.rank == 0:
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=precision.loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=decreasing, max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir) \
                and hasattr(saver, 'load_state_dict_from_checkpoint'):
            saver.load_state_dict_from_checkpoint(args.resume)
    args.__dict__.pop('_resume_ckpt', None)
    if args.rank == 0:
        _logger.info(f'Scheduled epochs: {num_epochs} (starting at {start_epoch}), {updates_per_epoch} updates '
                     f'per epoch, LR stepped per {"epoch" if getattr(lr_scheduler, "t_in_epochs", True) else "update"}. '
                     f'Output: {output_dir}')

    # ---- loop ----
    best_metric, best_epoch = None, None
    eval_metrics: Dict[str, float] = {}
    summary_path = os.path.join(output_dir, 'summary.csv') if output_dir else None
    if summary_path and start_epoch > 0:
        # rows past the checkpoint (a run stopped between its summary row and its checkpoint) would repeat
        dropped = trim_summary(summary_path, start_epoch)
        if dropped:
            _logger.info(f'summary.csv: dropped {dropped} row(s) from epoch {start_epoch} on (not in the checkpoint)')
    num_updates = start_epoch * updates_per_epoch
    t_loop = time.time()
    for epoch in range(start_epoch, num_epochs):
        # every epoch's randomness depends only on (seed, rank, epoch), so a run resumed from an epoch checkpoint
        # replays exactly what an uninterrupted run would have done, with any number of (persistent) workers:
        # shuffle order and augmentation from seed_loader_epoch (per sample index, before the epoch's iterator
        # is created), dropout and HE-DA / mixup draws from the global RNGs (epoch 0 seeded like timm: seed + rank)
        seed_loader_epoch(loader_train, args.seed, epoch, args.rank)
        random_seed(args.seed, args.rank + args.world_size * epoch)
        if teacher_cache is not None:
            teacher_cache.start_epoch(epoch, loader_train, args.rank)
        train_metrics, num_updates = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler=lr_scheduler,
            amp_autocast=precision.autocast, loss_scaler=precision.loss_scaler, mixup_fn=mixup_fn,
            num_updates_start=num_updates, model_dtype=precision.model_dtype, saver=saver, output_dir=output_dir)
        if teacher_cache is not None:
            teacher_cache.end_epoch(epoch)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')

        if (epoch + 1) % args.val_interval != 0 and epoch + 1 != num_epochs:
            # timm: no evaluation, no summary row and no checkpoint on skipped epochs; the LR still steps
            if args.rank == 0:
                _logger.info('Skipping eval and checkpointing (--val-interval)')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, metric=None)
            continue
        eval_metrics = {}
        if loader_eval is not None:
            eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, precision.autocast,
                                    model_dtype=precision.model_dtype)
            if task.has_ema() and not args.model_ema_force_cpu:
                ema_metrics = validate(task.get_eval_model(ema=True), loader_eval, args, device, precision.autocast,
                                       log_suffix=' (EMA)', model_dtype=precision.model_dtype)
                eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
        latest_metric = eval_metrics.get(eval_metric, train_metrics.get('loss'))
        if args.rank == 0:
            # timm: the row holds the LR the epoch was trained at, so the scheduler steps after it
            lrs = [pg['lr'] for pg in optimizer.param_groups]
            update_summary(epoch, train_metrics, eval_metrics, filename=summary_path, lr=sum(lrs) / len(lrs),
                           write_header=not os.path.exists(summary_path))
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
            plot_training_curves(summary_path, os.path.join(output_dir, 'training_curves.png'))
            done = epoch + 1 - start_epoch
            eta = (time.time() - t_loop) / done * (num_epochs - epoch - 1)
            left = num_epochs - epoch - 1
            _logger.info(f'Epoch {epoch} done in {_format_seconds(train_metrics["epoch_time"])}; '
                         f'{left} epoch{"" if left == 1 else "s"} left, ETA {_format_seconds(eta)}')
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)

    if teacher_cache is not None:
        teacher_cache.finish(num_epochs)
    result = dict(output_dir=output_dir, best_metric=best_metric, best_epoch=best_epoch, eval_metrics=eval_metrics,
                  thresholds=thresholds, num_epochs=num_epochs, time_s=time.time() - t0, task=task, model=model)
    if args.rank == 0:
        if best_metric is not None:
            _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
        if isinstance(teacher, StoredTeacher) and loader_eval is not None:
            _logger.info('No per-energy-bin report: the teacher is replayed from --teacher-cache, which holds no '
                         'validation outputs (the recording run wrote one)')
        elif teacher is not None and loader_eval is not None:  # where did distillation help? (per energy bin)
            # rank 0 alone: the unwrapped student, so no DDP collective runs on one rank
            rows = energy_bin_report(task.teacher_logits, unwrap_model(task.get_eval_model()), loader_eval,
                                     thresholds=thresholds,
                                     energy_temperature=args.energy_temperature, device=device,
                                     amp_autocast=precision.autocast)
            paths = write_energy_bin_report(rows, output_dir)
            _logger.info(f'Per-energy-bin report (validation set): {paths[0]}, {paths[1]}')
        export_hub(args, task, output_dir, eval_metrics, thresholds, dataset_train)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """CLI entry: parse (timm parity) -> check -> train (or the offline demo). Returns the result dict."""
    if not logging.getLogger().handlers:  # the demo calls main() several times: configure logging once
        setup_default_logging()
    args, args_text = parse_args(argv)
    if args.demo:
        from ..demo import run_demo
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
    shutil.rmtree(output_dir, ignore_errors=True)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry: bad input or a diverged run is one clear line on stderr and a non-zero exit status."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f'train_energykd.py: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f'train_energykd.py: error: {e}', file=sys.stderr)
        return 3
    except DiskWriteError as e:  # disk full / read-only: the message names the file and the problem
        print(f'train_energykd.py: error: {e}', file=sys.stderr)
        return 1
    return 0
