"""What one site does in a federated round, which site a node is, and the message protocol's
record names and keys. Plain Python: the Flower apps in ``client/`` and ``server/`` call this;
nothing here imports flwr."""
