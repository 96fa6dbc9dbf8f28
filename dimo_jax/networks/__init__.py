"""Network families (Linen modules), one module per family, and the conditioning convention they share."""
