"""The wire: the codec (msgpack plus raw numpy buffers, never pickle) and message frames."""
