"""Real deployment: container files, certificates and keys, and a loopback rehearsal."""
