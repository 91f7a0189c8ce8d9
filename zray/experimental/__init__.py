"""Experimental APIs, as in ``ray.experimental``: ``tqdm_ray``."""
