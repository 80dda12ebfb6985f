"""Datamodules, window datasets and value transforms.

Batch contract shared by every datamodule (see ``docs/data_contract.md``)::

    {"inputs":  float32 (B, T_in,  C, H, W)   network space (transform.encode applied)
     "targets": float32 (B, T_out, C, H, W)   network space
     "mask":    bool    (B, T_out, C, H, W)   True where the target is valid (optional)
     "issue_time": int64 (B,)  ns since 1970-01-01 of the last input frame (optional)}
"""
