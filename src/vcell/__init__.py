"""vcell: virtual cell modelling toolkit."""
__version__ = "0.1.0"
