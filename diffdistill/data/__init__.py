"""Datasets: toy distributions with exact teachers, Fashion-MNIST, image folders; a resumable batcher."""

from diffdistill.data.fashion_mnist import FashionMNIST
from diffdistill.data.images import Batch, ImageFolder, ImageTensorDataset, InfiniteBatcher, SyntheticImages
from diffdistill.data.toy import GaussianMixtureToy, GaussianToy

__all__ = [
    "Batch",
    "FashionMNIST",
    "GaussianMixtureToy",
    "GaussianToy",
    "ImageFolder",
    "ImageTensorDataset",
    "InfiniteBatcher",
    "SyntheticImages",
]
