"""Checkpoints: reading every released format safely, converting, publishing, FLOPs.

See :mod:`internimage.checkpoint.loading` for what loading guarantees (``weights_only=True``
for local files and URLs, explicit hash checks, a safe http(s) loader for mmengine).
"""
from .loading import (
                      HASH_IN_NAME,
                      HEAD_PREFIXES,
                      VERIFY_ENV,
                      backbone_state_dict,
                      check_coverage,
                      convert_checkpoint,
                      download_checkpoint,
                      hash_in_name,
                      load_backbone_weights,
                      load_classifier_weights,
                      load_file,
                      load_from_http_safe,
                      load_state_dict_checked,
                      map_head_22k_to_1k,
                      refuse_overwriting,
                      save_atomic,
                      sha256_of,
                      to_state_dict,
                      torch_load_safe,
                      verify_hash_in_name,
)

__all__ = ["HASH_IN_NAME", "HEAD_PREFIXES", "VERIFY_ENV", "backbone_state_dict", "check_coverage",
           "convert_checkpoint", "download_checkpoint", "hash_in_name", "load_backbone_weights",
           "load_classifier_weights", "load_file", "load_from_http_safe", "load_state_dict_checked",
           "map_head_22k_to_1k", "refuse_overwriting", "save_atomic", "sha256_of", "to_state_dict", "torch_load_safe",
           "verify_hash_in_name"]
