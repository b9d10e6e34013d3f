"""Real images: Fashion-MNIST and loaders for users' own data (ImageFolder, CIFAR-10-C, ImageNet-C)."""

from mechvit.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR10C,
    data_config,
    image_folder,
    imagenet_c,
    load_cifar10_c,
    normalize,
    timm_transform,
)
from mechvit.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    FashionMNISTError,
    load_fashion_mnist,
)
from mechvit.data.loading import DataConfig, Normalized, as_tensors, batches, load_split, n_items

__all__ = [
    "DataConfig",
    "Normalized",
    "as_tensors",
    "batches",
    "load_split",
    "n_items",
    "CIFAR10C",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "FashionMNISTError",
    "data_config",
    "image_folder",
    "imagenet_c",
    "load_cifar10_c",
    "load_fashion_mnist",
    "normalize",
    "timm_transform",
]
