"""Verification of draft tokens against the target: pure tensor functions, no transport.

`verify_block` (block.py) is the entry point; greedy.py, rejection.py and sampling.py hold the pieces.
"""

from workers.verify.block import VerifyResult, verify_block

__all__ = ["VerifyResult", "verify_block"]
