"""Datasets: toy distributions with exact teachers, Fashion-MNIST, image folders (in memory or decoded on demand),
WebDataset tar shards, Hugging Face datasets, prompts (a text file, COCO captions), precomputed VAE latents; the
resumable data stream the trainer reads."""

from diffdistill.data.archives import TarShards
from diffdistill.data.fashion_mnist import FashionMNIST
from diffdistill.data.hf import HFImages
from diffdistill.data.images import Batch, ImageFolder, ImageTensorDataset, InfiniteBatcher, SyntheticImages
from diffdistill.data.latents import LatentDataset, encode_latents
from diffdistill.data.loader import DataStream, LoaderOptions
from diffdistill.data.prompts import CaptionedImages, CocoCaptions, PromptDataset, PromptFile
from diffdistill.data.streaming import EncodedImages, ImageFolderStream
from diffdistill.data.toy import GaussianMixtureToy, GaussianToy

__all__ = [
    "Batch",
    "CaptionedImages",
    "CocoCaptions",
    "DataStream",
    "EncodedImages",
    "FashionMNIST",
    "GaussianMixtureToy",
    "GaussianToy",
    "HFImages",
    "ImageFolder",
    "ImageFolderStream",
    "ImageTensorDataset",
    "InfiniteBatcher",
    "LatentDataset",
    "LoaderOptions",
    "PromptDataset",
    "PromptFile",
    "SyntheticImages",
    "TarShards",
    "encode_latents",
]
