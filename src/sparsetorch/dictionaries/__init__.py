"""Sparse dictionaries on a model's activations: harvesting, SAEs (TopK, BatchTopK, JumpReLU),
crosscoders and Latent Scaling, and the metrics that judge them (docs/dictionaries.md)."""

from .harvest import ActivationStore, Manifest, corpus_windows, harvest, read_manifest
from .metrics import ReconStats, SpliceResult, recon_stats, sae_splice, splice_losses
from .sae import SAEConfig, SparseAutoencoder
from .sites import Site, parse_site, read_site, splice_site, valid_sites
from .train import TrainOptions, TrainResult, train_on_store, train_sae

__all__ = ["ActivationStore", "Manifest", "corpus_windows", "harvest", "read_manifest", "ReconStats",
           "SpliceResult", "recon_stats", "sae_splice", "splice_losses", "SAEConfig", "SparseAutoencoder",
           "Site", "parse_site", "read_site", "splice_site", "valid_sites", "TrainOptions", "TrainResult",
           "train_on_store", "train_sae"]
