//! Object detection post-processing: boxes, IoU, non-maximum suppression (being written).
