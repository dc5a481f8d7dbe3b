"""The run's last step: export the best student for the Hub (and push it), from the run's own files."""
import logging
import os

from timm.utils.model import unwrap_model

from ..files import load_checkpoint_file

_logger = logging.getLogger('train')


def export_hub(args, task, output_dir, eval_metrics, thresholds, dataset_train) -> None:
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
    record = hub.record_for_output(run_info, metrics, output_dir)  # + the curves and per-energy-bin report
    hub.export_for_hub(model, folder, run_info=run_info, record=record, label_names=label_names,
                       data_config=getattr(args, '_data_config', None))
    if args.push_to_hub:
        try:
            url = hub.push_to_hub(folder, args.push_to_hub, private=args.hub_private, revision=args.hub_revision)
        except hub.HubPushError as e:  # the run's outputs and the export are on disk: say how to retry
            _logger.error(f'{e}. Retry with: python -m timm_energykd.hub push {folder} {args.push_to_hub}')
            raise
        _logger.info(f'Pushed to {url}')
