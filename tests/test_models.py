"""The model zoo: registration, timm model API, parameter counts, feature extraction.

timm's own model tests run on every model in tests/test_timm_model_suite.py; these check what they do not
(equal numbers across the feature paths and torchscript, dtypes at forward, pruning per tap)."""
import pytest
import torch
import torch.nn as nn

import timm

import timm_energykd  # noqa: F401  (registers the models)
from timm_energykd.models import CifarResNet, ShuffleNetV2
from timm_energykd.models.profile import count_macs, count_params, package_model_names

# Parameter counts for 100 classes (CIFAR) / 1000 classes (ImageNet), computed by these modules and checked
# against the literature: CRD / mdistiller tables (ResNet8x4 1.23M, ResNet32x4 7.43M, WRN-40-2 2.26M,
# WRN-16-2 0.70M, ResNet56 0.86M, ResNet20 0.28M, VGG13 9.46M, VGG8 3.97M, MobileNetV2 0.81M,
# ShuffleNetV1 0.95M, ShuffleNetV2 1.36M) and torchvision's ShuffleNetV2 (exactly equal, see below).
EXPECTED_PARAMS = {
    'cifar_resnet8': 83_892,
    'cifar_resnet14': 181_108,
    'cifar_resnet20': 278_324,
    'cifar_resnet32': 472_756,
    'cifar_resnet44': 667_188,
    'cifar_resnet56': 861_620,
    'cifar_resnet110': 1_736_564,
    'cifar_resnet8x4': 1_233_540,
    'cifar_resnet32x4': 7_433_860,
    'cifar_wrn_16_1': 180_916,
    'cifar_wrn_16_2': 703_284,
    'cifar_wrn_40_1': 569_780,
    'cifar_wrn_40_2': 2_255_156,
    'cifar_vgg8': 3_965_028,
    'cifar_vgg11': 9_277_284,
    'cifar_vgg13': 9_462_180,
    'cifar_vgg16': 14_774_436,
    'cifar_vgg19': 20_086_692,
    'cifar_mobilenetv2': 812_836,
    'cifar_shufflenetv1': 949_258,
    'cifar_shufflenetv2': 1_355_528,
    'shufflenetv2_x0_5': 1_366_792,
    'shufflenetv2_x1_0': 2_278_604,
    'shufflenetv2_x1_5': 3_503_624,
    'shufflenetv2_x2_0': 7_393_996,
}

# Published values (millions, 100 classes) the counts above must round to.
PUBLISHED_M = {
    'cifar_resnet8x4': 1.23, 'cifar_resnet32x4': 7.43, 'cifar_wrn_40_2': 2.26, 'cifar_wrn_16_2': 0.70,
    'cifar_resnet56': 0.86, 'cifar_resnet20': 0.28, 'cifar_vgg13': 9.46, 'cifar_vgg8': 3.97,
    'cifar_mobilenetv2': 0.81, 'cifar_shufflenetv1': 0.95, 'cifar_shufflenetv2': 1.36,
}

CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
NAMES = package_model_names()
CIFAR_NAMES = [n for n in NAMES if n.startswith('cifar_')]


def _input(name, batch=2):
    # ImageNet models at their real size but batch 1 (small spatial sizes hit slow CPU depthwise kernels).
    if name.startswith('shufflenetv2_'):
        return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_model_without_clashing_with_timm():
    assert sorted(NAMES) == sorted(EXPECTED_PARAMS)
    assert set(timm.list_models('*shufflenet*')) >= {'cifar_shufflenetv1', 'cifar_shufflenetv2', 'shufflenetv2_x1_0'}
    for name in NAMES:
        # Our entrypoint, not a timm built-in that we overwrote.
        assert timm.models.model_entrypoint(name).__module__.startswith('timm_energykd.models'), name


def test_published_parameter_counts():
    for name, published in PUBLISHED_M.items():
        assert round(EXPECTED_PARAMS[name] / 1e6, 2) == published, name


@pytest.mark.parametrize('name', NAMES)
def test_build_forward_backward_and_param_count(name):
    model = timm.create_model(name)
    assert count_params(model) == EXPECTED_PARAMS[name]
    assert model.num_classes == (100 if name.startswith('cifar_') else 1000)
    x = _input(name)
    out = model(x)
    assert out.shape == (x.shape[0], model.num_classes)
    out.logsumexp(dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('name', NAMES)
def test_timm_model_api(name):
    model = timm.create_model(name, num_classes=10).eval()
    cfg = model.pretrained_cfg
    if name.startswith('cifar_'):
        assert cfg['input_size'] == (3, 32, 32)
        assert tuple(cfg['mean']) == CIFAR_MEAN and tuple(cfg['std']) == CIFAR_STD
    else:
        assert cfg['input_size'] == (3, 224, 224)
    assert cfg['classifier'] == 'fc' and model.get_classifier() is model.fc
    assert dict(model.named_modules())[cfg['first_conv']].in_channels == 3 == model.in_chans

    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.ndim == 4 and feats.shape[:2] == (x.shape[0], model.num_features)
        if name.startswith('cifar_'):
            assert tuple(feats.shape[2:]) == cfg['pool_size']
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (x.shape[0], model.head_hidden_size) and model.head_hidden_size == model.num_features
        logits = model.forward_head(feats)
        assert logits.shape == (x.shape[0], 10)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(model.fc(pre), logits, atol=1e-5)

        # (the head alone is enough here: the features do not depend on the classifier)
        model.reset_classifier(7)
        assert model.num_classes == 7 and model.forward_head(feats).shape == (x.shape[0], 7)
        model.reset_classifier(0)
        assert model.forward_head(feats).shape == (x.shape[0], model.num_features)
        assert isinstance(model.get_classifier(), nn.Identity)


def test_pretrained_without_weights_raises_timms_error():
    with pytest.raises(RuntimeError, match='No pretrained weights'):
        timm.create_model('cifar_resnet8x4', pretrained=True)


@pytest.mark.parametrize('name', ['cifar_resnet8x4', 'cifar_wrn_16_2', 'cifar_vgg8', 'cifar_mobilenetv2',
                                  'cifar_shufflenetv1', 'cifar_shufflenetv2', 'shufflenetv2_x0_5'])
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name).eval()
    fmodel = timm.create_model(name, features_only=True).eval()
    x = _input(name, batch=1)
    with torch.no_grad():
        outs = fmodel(x)
    info = model.feature_info
    assert len(outs) == len(info)
    for out, i in zip(outs, info):
        assert out.shape[1] == i['num_chs']
        assert x.shape[-1] // out.shape[-1] == i['reduction']


# One model per family (the CIFAR and the ImageNet ShuffleNetV2 differ in the stem pool).
FAMILIES = ['cifar_resnet8', 'cifar_wrn_16_1', 'cifar_vgg8', 'cifar_mobilenetv2', 'cifar_shufflenetv1',
            'cifar_shufflenetv2', 'shufflenetv2_x0_5']


def _small_input(name, batch=2):
    # ImageNet ShuffleNetV2 at 64 px: every tap keeps a spatial extent (2x2 at the end), and it is fast on CPU
    size = 64 if name.startswith('shufflenetv2_') else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('name', ['cifar_resnet14'] + FAMILIES[1:])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = _small_input(name).requires_grad_(True)

    def grads():
        model.zero_grad()
        out, taps = model.forward_intermediates(x)
        (model.forward_head(out).sum() + sum(t.mean() for t in taps)).backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = [None] * 2
    model(x).sum().backward()
    ref[0] = [p.grad.clone() for p in model.parameters()]
    ref[1] = grads()
    model.zero_grad()
    # BN running stats changed in the first pass; gradients do not depend on them in train mode.
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, r in zip((p.grad for p in model.parameters()), ref[0]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads(), ref[1]):  # forward_intermediates checkpoints per block too
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_timm_factory_device_dtype_and_in_chans(name):
    # timm.create_model's device / dtype reach every parameter and buffer (meta: no memory, no init cost)
    model = timm.create_model(name, device='meta', in_chans=1)
    assert all(t.device.type == 'meta' for t in [*model.parameters(), *model.buffers()])
    assert model.in_chans == 1 and dict(model.named_modules())[model.pretrained_cfg['first_conv']].in_channels == 1
    model = timm.create_model(name, device='meta', dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.in_chans == 3


@pytest.mark.parametrize('name', FAMILIES)
def test_bf16_and_float64_models_keep_their_dtype_through_reset_classifier(name):
    x = _small_input(name, batch=1)
    model = timm.create_model(name, dtype=torch.bfloat16).eval()
    model.reset_classifier(7)
    assert model.fc.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(x.bfloat16()).dtype == torch.bfloat16
    model = timm.create_model(name).double().train()
    model.reset_classifier(5)
    assert model.fc.weight.dtype == torch.float64 and model.fc.training
    assert model(x.double()).shape == (1, 5)


@pytest.mark.parametrize('name', FAMILIES)
def test_catavgmax_head_width(name):
    model = timm.create_model(name, num_classes=3, global_pool='catavgmax').eval()
    x = _small_input(name, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features  # timm: num_features is the unpooled width
        assert model.forward_head(feats, pre_logits=True).shape[1] == model.head_hidden_size == 2 * model.num_features
        assert model(x).shape == (1, 3)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(4, 'avg')
        assert model.head_hidden_size == model.num_features and model(x).shape == (1, 4)


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_intermediates_are_the_features_only_taps(name):
    """forward_intermediates returns exactly what features_only returns (default and 'getter' wrappers,
    all taps and a selection), and its final output is forward_features."""
    x = _small_input(name, batch=1)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    n = len(model.feature_info)
    with torch.no_grad():
        out, taps = model.forward_intermediates(x)
        torch.testing.assert_close(out, model.forward_features(x), rtol=0, atol=0)
        assert [t.shape[1] for t in taps] == [i['num_chs'] for i in model.feature_info]
        for indices in (None, (1, n - 1)):
            kwargs = {} if indices is None else dict(out_indices=indices)
            expected = taps if indices is None else [taps[i] for i in indices]
            for feature_cls in (None, 'getter'):
                if feature_cls:
                    kwargs['feature_cls'] = feature_cls
                torch.manual_seed(0)
                fmodel = timm.create_model(name, features_only=True, **kwargs).eval()
                torch.testing.assert_close(fmodel(x), expected, rtol=0, atol=0)
            early = model.forward_intermediates(x, indices=indices, stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early, expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', FAMILIES)
def test_prune_intermediate_layers_ends_the_features_at_the_tap(name):
    import copy
    x = _small_input(name, batch=1)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        for i, tap in enumerate(taps):
            pruned = copy.deepcopy(model)
            assert pruned.prune_intermediate_layers([i]) == [i]
            torch.testing.assert_close(pruned.forward_features(x), tap, rtol=0, atol=0)
            assert pruned.num_features == pruned.head_hidden_size == tap.shape[1]
            assert pruned(x).shape == tap.shape  # head and pooling removed
            assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
        # keeping the head at the last tap keeps the model's output
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([len(taps) - 1], prune_head=False)
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', FAMILIES)
def test_torchscript_matches_eager(name):
    x = _small_input(name, batch=1)
    model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['cifar_resnet8', 'cifar_mobilenetv2'])
def test_torch_compile_full_graph(name):
    # dynamo traces forward without graph breaks (the grad-checkpointing branch is not taken in eval)
    x = _small_input(name, batch=1)
    model = timm.create_model(name).eval()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_group_matcher_covers_all_parameters():
    from timm.models import group_parameters
    for name in ['cifar_resnet20', 'cifar_wrn_16_2', 'cifar_vgg8', 'cifar_mobilenetv2', 'cifar_shufflenetv2']:
        model = timm.create_model(name)
        groups = group_parameters(model, model.group_matcher())
        assert sum(len(v) for v in groups.values()) == len(list(model.parameters())), name


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match='depth'):
        CifarResNet(depth=9)
    with pytest.raises(ValueError, match='stem'):
        ShuffleNetV2(stem='tiny')


def test_macs_of_known_models():
    # ShuffleNetV2 paper: 41 / 146 / 299 / 591 MFLOPs (multiply-adds, its counting convention may add a few
    # percent: shortcut adds, BN); ours counts conv + linear MACs only.
    model = timm.create_model('shufflenetv2_x1_0')
    assert 140e6 < count_macs(model) < 150e6
    # A plain CIFAR ResNet-20: the 18 3x3 convs + stem + shortcuts + fc, ~40.8M MACs (He et al.: 41M FLOPs).
    assert abs(count_macs(timm.create_model('cifar_resnet20')) - 40.8e6) < 0.1e6


def test_imagenet_shufflenetv2_matches_torchvision(tmp_path):
    """Same architecture as torchvision's ShuffleNetV2 (public API): its state dict loads through our key
    mapping, strictly, and gives the same logits."""
    tv_models = pytest.importorskip('torchvision.models')
    from timm_energykd.models.shufflenetv2 import checkpoint_filter_fn
    torch.manual_seed(0)
    ref = tv_models.shufflenet_v2_x0_5().eval()
    # Give BN non-trivial statistics so a mis-mapped copy cannot pass.
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = timm.create_model('shufflenetv2_x0_5').eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
    # and through timm's own pretrained path, from a torchvision-format file
    path = tmp_path / 'tv.pth'
    torch.save(ref.state_dict(), path)
    loaded = timm.create_model('shufflenetv2_x0_5', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)


def test_hub_style_round_trip_through_local_dir(tmp_path):
    # save_for_hf writes config.json (architecture + pretrained_cfg) the way push_to_hf_hub does; loading it
    # back needs the architecture in timm's registry, which importing timm_energykd provides.
    from timm.models import save_for_hf
    model = timm.create_model('cifar_wrn_16_1', num_classes=10).eval()
    save_for_hf(model, str(tmp_path))
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.num_classes == 10
    assert tuple(loaded.pretrained_cfg['mean']) == CIFAR_MEAN
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _task_input(name):
    # CIFAR models at 32 px; the ImageNet ShuffleNetV2 at 64 px (its strides leave 2x2 before the pool)
    size = 64 if name.startswith('shufflenetv2_') else 32
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('name', NAMES)
def test_works_as_teacher_and_as_student_in_the_task(name):
    """Every registered model as the student (forward + backward) and as the teacher (frozen, eval) of
    EnergyDistillationTask, each paired with a small partner (cifar_resnet8 / timm's test_resnet)."""
    from timm_energykd.task import EnergyDistillationTask
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch of 2: one thread is fastest, and immune to a busy shared machine
    try:
        _teacher_and_student_steps(name, EnergyDistillationTask)
    finally:
        torch.set_num_threads(threads)


def _teacher_and_student_steps(name, EnergyDistillationTask):
    partner = 'test_resnet' if name.startswith('shufflenetv2_') else 'cifar_resnet8'
    x = _task_input(name)
    y = torch.tensor([0, 2])
    torch.manual_seed(0)
    for student_name, teacher_name in ((name, partner), (partner, name)):
        student = timm.create_model(student_name, num_classes=3)
        teacher = timm.create_model(teacher_name, num_classes=3)
        task = EnergyDistillationTask(student, teacher, nn.CrossEntropyLoss(), distill_loss='energy_kd',
                                      threshold_mode='batch', verbose=False)
        task.train()
        out = task(x, y)
        assert out['output'].shape == (2, 3) and torch.isfinite(out['loss'])
        out['loss'].backward()
        assert all(p.grad is not None for p in student.parameters() if p.requires_grad), student_name
        assert not teacher.training and all(p.grad is None for p in teacher.parameters()), teacher_name
