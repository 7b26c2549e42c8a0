"""Flower ClientApp (thin placeholder until the federation issue lands)."""

from flwr.clientapp import ClientApp

app = ClientApp()
