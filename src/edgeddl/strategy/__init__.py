"""How a step learns: data-parallel, federated and split strategies behind one interface
(`base.py`)."""
