"""Real images: Fashion-MNIST and loaders for users' own data (ImageFolder, CIFAR-10-C, ImageNet-C)."""

from mechvit.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    FashionMNISTError,
    load_fashion_mnist,
)

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNIST", "FashionMNISTError", "load_fashion_mnist"]
