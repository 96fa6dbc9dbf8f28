"""Token data sets, batch streams, image grids and known joints."""
