"""The Intel AVF (Adaptive Virtual Function) NIC model."""
