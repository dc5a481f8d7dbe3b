from .cifar_resnet import CifarResNet
from .cifar_wrn import CifarWideResNet
from .cifar_vgg import CifarVGG
from .cifar_mobilenetv2 import CifarMobileNetV2
