"""IAM model parts, one module per idea (docs/method.md, sections 1-3)."""

from .backbone import ARCHS, BackboneOutput, ResNetFCN
from .filling import InstanceExtentFilling, propagate_affinity
from .peak_backprop import PeakBackprop, reference_peak_response_maps
from .peaks import Peaks, find_peaks, peak_input_coordinates, peak_stimulated_scores
from .reference_checkpoint import (
    CheckpointError,
    ReferenceSettings,
    load_reference_filling,
    load_reference_prm,
    read_reference_config,
)

__all__ = [
    "ARCHS", "BackboneOutput", "CheckpointError", "InstanceExtentFilling", "PeakBackprop", "Peaks",
    "ReferenceSettings", "ResNetFCN", "read_reference_config", "find_peaks", "load_reference_filling", "peak_input_coordinates", "load_reference_prm", "peak_stimulated_scores",
    "propagate_affinity", "reference_peak_response_maps",
]
