"""One training epoch and one validation pass, with timm's ``train.py`` log lines and semantics.

The task's per-step terms (loss, task / KD / HE-DA terms, energy shares, temperature) stay on the device
and are read once per ``--log-interval``: that read is the only host sync, and it is also the finite-loss
guard, so a NaN or inf in any term stops the run there, before a checkpoint could store NaN weights.
"""
import logging
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

_logger = logging.getLogger('train')

# Per-step terms the distillation task returns as 0-d tensors (averaged per epoch into summary.csv).
TERMS = ('loss', 'task_loss', 'kd_loss', 'he_da_loss', 'he_da_frac', 'energy_mean', 'frac_low', 'frac_high',
         'temp_mean')


class NonFiniteError(RuntimeError):
    """Training produced NaN / inf (diverged, or a non-finite teacher); the run stops without saving."""


def _read_terms(sums: Dict[str, torch.Tensor], count: int, args, epoch: int, batch_idx: int) -> Dict[str, float]:
    """The one host sync per log interval: averages of the task's 0-d tensors, checked finite."""
    out = {}
    for k, v in sums.items():
        if args.distributed:
            v = reduce_tensor(v.detach().clone(), args.world_size)
        out[k] = v.item() / max(count, 1) if k != 'teacher_nonfinite' else v.item()
    if out.get('teacher_nonfinite', 0) > 0:
        raise NonFiniteError(
            f'teacher produced non-finite logits for {int(out["teacher_nonfinite"])} samples '
            f'(epoch {epoch}, up to batch {batch_idx}); check --teacher-checkpoint, the input normalisation '
            f'and --amp-dtype (float16 can overflow; try bfloat16)')
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f'non-finite training loss at epoch {epoch}, batch {batch_idx} (terms: {", ".join(bad)}); the run '
            f'stopped before saving; lower --lr, set --clip-grad, or check the flags of these terms')
    return out


def _set_mixup_off(args, epoch, loader, mixup_fn) -> None:
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and hasattr(loader, 'mixup_enabled'):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False


def train_one_epoch(epoch, task, loader, optimizer, args, device, lr_scheduler=None, amp_autocast=nullcontext,
                    loss_scaler=None, mixup_fn=None, num_updates_start=0, model_dtype=None, saver=None,
                    output_dir: Optional[str] = None) -> Tuple[Dict[str, float], int]:
    _set_mixup_off(args, epoch, loader, mixup_fn)
    second_order = hasattr(optimizer, 'is_second_order') and optimizer.is_second_order
    accum = args.grad_accum_steps
    task.train()
    distilling = args.teacher is not None and hasattr(task, 'set_progress')
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = num_updates_start
    last_idx = num_batches - 1
    sums: Dict[str, torch.Tensor] = {}
    count = seen = update_samples = 0
    update_time_m, data_time_m = AverageMeter(), AverageMeter()
    terms: Dict[str, float] = {}
    t_start = data_start = update_start = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        if not args.prefetcher:
            input, target = input.to(device=device, dtype=model_dtype), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(accum * (time.time() - data_start))
        if distilling:
            task.set_progress(epoch + batch_idx / num_batches)  # fractional epochs (DKD warm-up)
        source = getattr(task, 'teacher_source', None)
        if source is not None:  # --teacher-cache: this step's sample indices and HE-DA generators
            source.set_step(epoch, batch_idx)

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
        for k in TERMS + ('teacher_nonfinite',):
            if k in out:
                v = out[k].detach().float()
                sums[k] = sums[k] + v if k in sums else v.clone()
        count += 1
        seen += input.shape[0]
        update_samples += input.shape[0] * args.world_size
        if not need_update:
            data_start = time.time()
            continue
        optimizer.zero_grad()
        num_updates += 1
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.time()
        update_time_m.update(now - update_start)
        update_start = now

        update_idx = batch_idx // accum
        if last_batch or update_idx % args.log_interval == 0:
            terms = _read_terms(sums, count, args, epoch, batch_idx)
            loss_now = out['loss'].detach().float()
            if args.distributed:
                loss_now = reduce_tensor(loss_now.clone(), args.world_size)
            if args.rank == 0:
                _log_train_line(epoch, update_idx, updates_per_epoch, loss_now.item(), terms, update_time_m,
                                data_time_m, update_samples, optimizer)
                if args.save_images and output_dir:
                    import torchvision
                    torchvision.utils.save_image(input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                                 padding=0, normalize=True)
        if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        update_samples = 0
        data_start = time.time()

    if hasattr(optimizer, 'sync_lookahead'):
        optimizer.sync_lookahead()
    elapsed = time.time() - t_start
    metrics = OrderedDict((k, v) for k, v in terms.items() if k != 'teacher_nonfinite')
    if 'frac_low' in metrics and 'frac_high' in metrics:  # summary.csv: the three energy groups' shares
        metrics['frac_mid'] = 1.0 - metrics['frac_low'] - metrics['frac_high']
    metrics['img_per_sec'] = seen * args.world_size / max(elapsed, 1e-9)
    metrics['epoch_time'] = elapsed
    return metrics, num_updates


def _log_train_line(epoch, update_idx, updates_per_epoch, loss_now, terms, update_time_m, data_time_m,
                    update_samples, optimizer) -> None:
    """timm's train line (loss now and running average, update time and rate, LR, data time), then ours."""
    lrl = [pg['lr'] for pg in optimizer.param_groups]
    lr = sum(lrl) / len(lrl)
    rate_now = update_samples / max(update_time_m.val, 1e-9)
    rate_avg = update_samples / max(update_time_m.avg, 1e-9)
    msg = (f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
           f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
           f'Loss: {loss_now:#.3g} ({terms["loss"]:#.3g})  '
           f'Time: {update_time_m.val:.3f}s, {rate_now:>7.2f}/s  ({update_time_m.avg:.3f}s, {rate_avg:>7.2f}/s)  '
           f'LR: {lr:.3e}  Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})')
    if 'kd_loss' in terms:
        msg += f'  task: {terms["task_loss"]:.4f}  kd: {terms["kd_loss"]:.4f}'
    if 'he_da_loss' in terms:
        msg += f'  he-da: {terms["he_da_loss"]:.4f} ({100 * terms["he_da_frac"]:.0f}% mixed)'
    if 'energy_mean' in terms:
        msg += (f'  E: {terms["energy_mean"]:.3f}  low/high: {100 * terms["frac_low"]:.0f}%/'
                f'{100 * terms["frac_high"]:.0f}%  T: {terms["temp_mean"]:.2f}')
    _logger.info(msg)


def validate(model, loader, args, device, amp_autocast=nullcontext, log_suffix='', model_dtype=None
             ) -> Dict[str, float]:
    """timm's validation: CE loss, top-1 / top-5, a log line every ``--log-interval`` batches and the last."""
    loss_fn = nn.CrossEntropyLoss().to(device)
    batch_time_m, losses_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    last_idx = len(loader) - 1
    end = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            if not args.prefetcher:
                input, target = input.to(device=device, dtype=model_dtype), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output.float(), target)
            acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            if args.distributed:
                loss = reduce_tensor(loss.data, args.world_size)
                acc1 = reduce_tensor(acc1, args.world_size)
                acc5 = reduce_tensor(acc5, args.world_size)
            n = output.shape[0]
            losses_m.update(loss.item(), n)
            top1_m.update(acc1.item(), n)
            top5_m.update(acc5.item(), n)
            batch_time_m.update(time.time() - end)
            end = time.time()
            if args.rank == 0 and (batch_idx == last_idx or batch_idx % args.log_interval == 0):
                _logger.info(
                    f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  '
                    f'Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})  '
                    f'Loss: {losses_m.val:>7.3f} ({losses_m.avg:>6.3f})  '
                    f'Acc@1: {top1_m.val:>7.3f} ({top1_m.avg:>7.3f})  '
                    f'Acc@5: {top5_m.val:>7.3f} ({top5_m.avg:>7.3f})')
    if not math.isfinite(losses_m.avg):
        raise NonFiniteError(f'validation loss{log_suffix} is {losses_m.avg}: the weights are not finite; '
                             'the run stopped before saving')
    return OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])
