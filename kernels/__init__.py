"""Attention kernels: Triton implementations with a torch reference beside each, behind one dispatch layer."""
