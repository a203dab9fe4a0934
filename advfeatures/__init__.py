"""advfeatures: adversarial examples are features, not bugs (Ilyas et al. 2019), replicated."""

__version__ = "0.1.0"
