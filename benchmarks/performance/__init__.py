"""Performance: speed, precision, memory, chunking, index scale and serving load."""
