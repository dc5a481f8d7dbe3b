"""Model zoo: the CIFAR architectures of the KD literature and ShuffleNetV2 for ImageNet.

Importing this package registers every model in timm's registry (``timm.create_model('cifar_resnet8x4')``).
``convert`` imports mdistiller / RepDistiller checkpoints into them.
"""
from .cifar_mobilenetv2 import CifarMobileNetV2
from .cifar_resnet import CifarResNet
from .cifar_shufflenet import CifarShuffleNetV1
from .cifar_vgg import CifarVGG
from .cifar_wrn import CifarWideResNet
from .shufflenetv2 import ShuffleNetV2

__all__ = [
    'CifarMobileNetV2', 'CifarResNet', 'CifarShuffleNetV1', 'CifarVGG', 'CifarWideResNet', 'ShuffleNetV2',
    'MDISTILLER_NAMES', 'convert_mdistiller_checkpoint', 'remap_mdistiller_state_dict',
    'load_mdistiller_state_dict', 'save_safetensors',
]

_CONVERT_API = (
    'MDISTILLER_NAMES', 'convert_mdistiller_checkpoint', 'remap_mdistiller_state_dict',
    'load_mdistiller_state_dict', 'save_safetensors',
)


def __getattr__(name):
    # Imported lazily so that `python -m timm_energykd.models.convert` does not find the module already
    # imported by its own package (runpy warns about that).
    if name in _CONVERT_API:
        from . import convert
        return getattr(convert, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
