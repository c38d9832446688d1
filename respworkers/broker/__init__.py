"""The broker: ``core`` decides, ``server`` owns the sockets, ``journal`` remembers."""
