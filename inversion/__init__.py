"""DDIM inversion and recovery, the MSI module and its training, and key files."""
