"""Model families: what the modes need from each kind of token network (``families.base``)."""
