"""Pipeline stages: one module per stage; artifact.py is the protocol every stage follows."""
