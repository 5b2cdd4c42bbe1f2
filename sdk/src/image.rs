//! Images: decode, resize, crop, normalise to NCHW/NHWC tensors (being written).
